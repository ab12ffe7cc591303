"""Load generation and benchmark reports (`qwen-vllm bench`).

Pure control plane: nothing here imports vLLM or torch, so the load generator
runs from any machine that can reach the API.
"""
