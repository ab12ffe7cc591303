"""Offline use without servers: the Python `QwenChat` API on vLLM's `LLM` and
the terminal chat of `qwen-vllm chat`."""
