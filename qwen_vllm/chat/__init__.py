"""The Qwen v1 chat format: vocabulary facts, the tokenizer, ChatML and ReAct.

Shared by the model plugin and the control plane, so nothing here imports
vLLM or torch; `chatml`, `react` and `vocab` are pure Python.
"""
