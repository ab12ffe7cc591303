"""Checkpoint tools: the embedded demo model, the Qwen2 layout of a Qwen v1
checkpoint, and the one check that `--model` names a checkpoint directory.
Nothing in the serving control plane imports these."""
