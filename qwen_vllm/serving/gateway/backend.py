"""What the gateway needs from the control plane.

ControllerClient implements both protocols; tests pass fakes. Backends raise
qwen_vllm.serving.client's BackendError subclasses (UnknownModelError,
NoWorkerError, WorkerError, ...) when a request cannot start.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

from qwen_vllm.serving.client import ModelDetails, WorkerInfo
from qwen_vllm.serving.protocol import GenerateChunk, GenerateParams


class Backend(Protocol):
    async def list_models(self) -> list[str]: ...

    def generate_stream(
        self, model: str, params: GenerateParams
    ) -> AsyncIterator[GenerateChunk]:
        """FastChat chunks (`text` is the whole output so far); closing the
        iterator must abort the generation."""
        ...

    async def generate(self, model: str, params: GenerateParams) -> GenerateChunk: ...

    async def model_details(self, model: str) -> ModelDetails: ...


@runtime_checkable
class WorkerStatusSource(Protocol):
    """Optional: backends that can list workers feed the queue-depth metrics."""

    async def workers(self) -> list[WorkerInfo]: ...
