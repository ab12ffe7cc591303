"""Running the stack: `qwen-vllm serve` on Ray (actors and their supervisor),
one service under uvicorn, process lifecycle, and launch plans for multi-GPU
nodes and clusters (`qwen-vllm launch`)."""
