"""The OpenAI-compatible API gateway in front of the controller and workers.

Pure control plane: nothing here imports vLLM, torch or transformers.
"""

from qwen_vllm.serving.client import Backend
from qwen_vllm.serving.gateway.app import create_app

__all__ = ["Backend", "create_app"]
