"""The controller: FastChat's controller protocol, with active health checks.

`registry` holds the workers and routing policies, `service` probes workers
and proxies streams, `app` is the HTTP app (`create_app(settings)`).
"""

from qwen_vllm.serving.controller.app import create_app

__all__ = ["create_app"]
