"""What the chat and completion services share: plan the worker requests of
a request's choices, run them, and answer whole or as server-sent events."""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from typing import ClassVar, Generic, Protocol, TypeVar

from qwen_vllm.serving.client import Backend, BackendError
from qwen_vllm.serving.gateway.choice_streams import ChoiceStreams
from qwen_vllm.serving.gateway.errors import APIError, from_backend
from qwen_vllm.serving.gateway.metrics import GatewayMetrics
from qwen_vllm.serving.gateway.openai_models import SamplingRequest
from qwen_vllm.serving.gateway.planning import PlanT, RequestT
from qwen_vllm.serving.gateway.results import UsageCounter, failure, worker_failed
from qwen_vllm.serving.gateway.streaming import (
    DONE_EVENT,
    EventStream,
    StreamState,
    sse_event,
)
from qwen_vllm.serving.protocol import GenerateChunk, GenerateParams, Usage
from qwen_vllm.serving.settings import GatewaySettings

ResponseT = TypeVar("ResponseT")
_RequestIn = TypeVar("_RequestIn", bound=SamplingRequest, contravariant=True)
_ResponseOut = TypeVar("_ResponseOut", covariant=True)


class OpenAIService(Protocol[_RequestIn, _ResponseOut]):
    """What a route needs of the service behind it."""

    async def complete(self, request: _RequestIn) -> _ResponseOut:
        """The whole response."""
        ...

    async def stream(self, request: _RequestIn) -> EventStream:
        """Opens the worker streams (errors so far raise) and returns the SSE."""
        ...


class GenerationService(ABC, Generic[RequestT, PlanT, ResponseT]):
    """An OpenAIService over the backend's workers. Subclasses turn a request
    into a plan, worker chunks into a whole response, and say how its stream
    looks."""

    # The request field a failure of the prompt is reported against.
    prompt_param: ClassVar[str]

    def __init__(
        self, backend: Backend, settings: GatewaySettings, metrics: GatewayMetrics
    ) -> None:
        self.backend = backend
        self.settings = settings
        self.metrics = metrics

    @abstractmethod
    async def plan(self, request: RequestT) -> PlanT: ...

    @abstractmethod
    def response(
        self,
        request: RequestT,
        plan: PlanT,
        chunks: list[GenerateChunk],
        usage: Usage,
    ) -> ResponseT:
        """The whole response from every choice's final chunk."""

    @abstractmethod
    def stream_state(
        self, request: RequestT, plan: PlanT
    ) -> StreamState[RequestT, PlanT]: ...

    async def complete(self, request: RequestT) -> ResponseT:
        plan = await self.plan(request)
        chunks = await generate_all(self.backend, request.model, plan.params)
        usage = UsageCounter()
        for index, chunk in enumerate(chunks):
            if worker_failed(chunk):
                raise failure(chunk, self.prompt_param)
            usage.record(index, plan.prompt_of(index), chunk)
        total = usage.usage()
        response = self.response(request, plan, chunks, total)
        self._count_tokens(request.model, total)
        return response

    async def stream(self, request: RequestT) -> EventStream:
        """Opens the worker streams (errors so far raise) and returns the SSE."""
        started = time.perf_counter()
        plan = await self.plan(request)
        streams = await ChoiceStreams.open(
            self.backend, request.model, plan.params, self.prompt_param
        )
        self.metrics.time_to_first_token.labels(request.model).observe(
            time.perf_counter() - started
        )
        return EventStream(self._sse(request, plan, streams), streams.close)

    async def _sse(
        self, request: RequestT, plan: PlanT, streams: ChoiceStreams
    ) -> AsyncIterator[str]:
        state = self.stream_state(request, plan)
        try:
            async for event in state.events(streams):
                yield event
        except APIError as exc:
            yield sse_event(exc.body())
        finally:
            await streams.close()
            self._count_tokens(request.model, state.usage.usage())
        yield DONE_EVENT

    def _count_tokens(self, model: str, usage: Usage) -> None:
        self.metrics.count_tokens(model, usage.prompt_tokens, usage.completion_tokens)


async def generate_all(
    backend: Backend, model: str, params: Sequence[GenerateParams]
) -> list[GenerateChunk]:
    """Whole generations, concurrently; the first failure cancels the rest."""
    tasks = [asyncio.ensure_future(backend.generate(model, p)) for p in params]
    try:
        return list(await asyncio.gather(*tasks))
    except BackendError as exc:
        raise from_backend(exc) from exc
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
