"""The Gradio chat web UI in front of the controller and workers.

Pure control plane: nothing here imports vLLM, torch or transformers.
"""

from qwen_vllm.serving.webui.app import create_app
from qwen_vllm.serving.webui.session import (
    ChatOptions,
    ChatSession,
    Turn,
    build_params,
)
from qwen_vllm.serving.webui.ui import ELEMENT_IDS

__all__ = [
    "ELEMENT_IDS",
    "ChatOptions",
    "ChatSession",
    "Turn",
    "build_params",
    "create_app",
]
