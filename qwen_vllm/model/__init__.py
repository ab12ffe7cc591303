"""The vLLM side of qwen_vllm: the Qwen v1 model and what vLLM needs to load it."""
