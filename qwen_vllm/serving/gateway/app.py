"""The OpenAI-compatible gateway: routes over the chat and completion services.

create_app(settings) talks to the controller through one ControllerClient on
one httpx.AsyncClient, opened and closed by the app's lifespan; tests pass a
fake Backend instead.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import httpx
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response, StreamingResponse
from starlette.background import BackgroundTask

from qwen_vllm import __version__
from qwen_vllm.serving.client import (
    Backend,
    BackendError,
    ControllerClient,
    WorkerAdmin,
    WorkerStatusSource,
)
from qwen_vllm.serving.gateway import adapter_admin
from qwen_vllm.serving.gateway.chat_service import ChatService
from qwen_vllm.serving.gateway.completion_service import CompletionService
from qwen_vllm.serving.gateway.errors import APIError, install_error_handlers
from qwen_vllm.serving.gateway.limits import (
    AccessMiddleware,
    ApiKeys,
    BodySizeLimitMiddleware,
    KeyLimits,
)
from qwen_vllm.serving.gateway.metrics import (
    EXPOSITION_CONTENT_TYPE,
    GatewayMetrics,
    MetricsMiddleware,
)
from qwen_vllm.serving.gateway.openai_models import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DeletedModel,
    ErrorResponse,
    LoadLoraAdapterRequest,
    ModelCard,
    ModelList,
    SamplingRequest,
    UnloadLoraAdapterRequest,
)
from qwen_vllm.serving.gateway.service import OpenAIService
from qwen_vllm.serving.gateway.streaming import SSE_HEADERS, EventStream
from qwen_vllm.serving.settings import GatewaySettings

logger = logging.getLogger(__name__)

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse}
    for status in (400, 401, 404, 413, 429, 502, 503, 504)
}


@dataclass
class Gateway:
    """Everything the routes use, built once per app."""

    backend: Backend
    chat: ChatService
    completions: CompletionService
    metrics: GatewayMetrics


def create_app(
    settings: GatewaySettings,
    backend: Backend | None = None,
    *,
    clock: Callable[[], float] = time.monotonic,
) -> FastAPI:
    """The gateway app; `clock` drives the per-key rate limits (tests set it)."""
    metrics = GatewayMetrics()

    def gateway_for(used: Backend) -> Gateway:
        return Gateway(
            used,
            ChatService(used, settings, metrics),
            CompletionService(used, settings, metrics),
            metrics,
        )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if backend is not None:
            yield
            return
        timeout = httpx.Timeout(settings.request_timeout, connect=5.0)
        # Each streamed choice holds a worker connection for its whole length;
        # the per-key limits bound how many there are.
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as http:
            app.state.gateway = gateway_for(
                ControllerClient.from_settings(http, settings)
            )
            yield

    app = FastAPI(
        title="qwen_vllm OpenAI-compatible API",
        version=__version__,
        lifespan=lifespan,
    )
    if backend is not None:
        app.state.gateway = gateway_for(backend)
    install_error_handlers(app)
    app.include_router(_routes())
    # Last added runs first: metrics see every answer, access is checked
    # before a body is read.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(
        AccessMiddleware,
        keys=ApiKeys(settings.api_keys),
        limits=KeyLimits(
            settings.requests_per_second_per_key,
            settings.burst_per_key,
            settings.max_concurrent_per_key,
            clock=clock,
        ),
    )
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    if settings.allowed_origins:
        # Outermost: a browser's preflight is answered before the key check
        # (it carries no Authorization header); the requests themselves are not.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.allowed_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    return app


def _gateway(request: Request) -> Gateway:
    gateway = getattr(request.app.state, "gateway", None)
    if gateway is None:
        raise APIError(503, "The gateway is starting.", code="not_ready")
    return gateway


GatewayDep = Annotated[Gateway, Depends(_gateway)]


def _routes() -> APIRouter:
    router = APIRouter()

    @router.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/metrics", response_class=Response)
    async def metrics(gateway: GatewayDep) -> Response:
        source = gateway.backend
        if isinstance(source, WorkerStatusSource):
            try:
                gateway.metrics.set_workers(await source.workers())
            except BackendError as exc:
                logger.warning("No worker list for metrics: %s", exc)
        return Response(
            gateway.metrics.exposition(), media_type=EXPOSITION_CONTENT_TYPE
        )

    @router.get("/v1/models", responses=_ERRORS)
    async def list_models(gateway: GatewayDep) -> ModelList:
        names = await gateway.backend.list_models()
        return ModelList(
            data=[
                ModelCard(id=name, parent=await _parent(gateway, name))
                for name in names
            ]
        )

    @router.post(
        "/v1/chat/completions",
        response_model=ChatCompletionResponse,
        response_model_exclude_none=True,
        responses=_ERRORS,
    )
    async def chat_completions(
        body: ChatCompletionRequest, request: Request, gateway: GatewayDep
    ) -> Any:
        return await _answer(gateway.chat, body, request)

    @router.post(
        "/v1/completions",
        response_model=CompletionResponse,
        response_model_exclude_none=True,
        responses=_ERRORS,
    )
    async def completions(
        body: CompletionRequest, request: Request, gateway: GatewayDep
    ) -> Any:
        return await _answer(gateway.completions, body, request)

    @router.post("/v1/load_lora_adapter", responses=_ERRORS)
    async def load_lora_adapter(
        body: LoadLoraAdapterRequest, gateway: GatewayDep
    ) -> ModelCard:
        return await adapter_admin.load_adapter(_admin(gateway), body)

    @router.post("/v1/unload_lora_adapter", responses=_ERRORS)
    async def unload_lora_adapter(
        body: UnloadLoraAdapterRequest, gateway: GatewayDep
    ) -> DeletedModel:
        return await adapter_admin.unload_adapter(_admin(gateway), body)

    return router


def _admin(gateway: Gateway) -> WorkerAdmin:
    if not isinstance(gateway.backend, WorkerAdmin):
        raise APIError(404, "This gateway cannot load adapters.", code="not_found")
    return gateway.backend


_Request = TypeVar("_Request", bound=SamplingRequest)
_Response = TypeVar("_Response")


async def _answer(
    service: OpenAIService[_Request, _Response], body: _Request, request: Request
) -> _Response | StreamingResponse:
    """The whole response, or its event stream if the request asks to stream."""
    answer: _Response | StreamingResponse
    if body.stream:
        answer = _event_stream(await service.stream(body))
    else:
        answer = await service.complete(body)
    request.state.model = body.model  # for the access metrics
    return answer


def _event_stream(stream: EventStream) -> StreamingResponse:
    # The background task closes the worker streams even when the response
    # never iterated the events (the client left before the first byte).
    return StreamingResponse(
        stream.events,
        media_type="text/event-stream",
        headers=SSE_HEADERS,
        background=BackgroundTask(stream.close),
    )


async def _parent(gateway: Gateway, model: str) -> str | None:
    """The base model of a LoRA adapter (None for a model), from its worker's
    details, which the client caches."""
    try:
        details = await gateway.backend.model_details(model)
    except BackendError:  # its workers are gone: listed, parent unknown
        return None
    return details.parent
