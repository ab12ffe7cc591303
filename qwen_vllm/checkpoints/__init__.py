"""Tools that write checkpoints: the embedded demo model and the Qwen2 layout
of a Qwen v1 checkpoint. Nothing in the serving control plane imports these."""
