"""The controller's HTTP app: FastChat's controller routes over the service.

FastChat's own workers, openai_api_server and web server work against it
unchanged. Unlike FastChat's controller it probes every worker each
`health_check_interval` seconds and stops routing to one after
`unhealthy_after_failures` failed probes in a row, instead of waiting 90 s for
a missing heartbeat; it never blocks the event loop, and it can require the
deployment's internal token on every endpoint but GET /health.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

import httpx
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, field_validator

from qwen_vllm.serving.controller.registry import ROUTING_POLICIES, WorkerRegistry
from qwen_vllm.serving.controller.service import (
    Controller,
    WorkerProbe,
    WorkerUnreachableError,
)
from qwen_vllm.serving.protocol import (
    HeartbeatRequest,
    ModelRequest,
    RegisterWorkerRequest,
    WorkerAddressRequest,
    validation_problems,
)
from qwen_vllm.serving.security import error_response, guard, token_headers
from qwen_vllm.serving.settings import ControllerSettings

logger = logging.getLogger(__name__)


def _normalize_worker_name(name: str) -> str:
    name = name.strip().rstrip("/")
    if not name.startswith(("http://", "https://")):
        raise ValueError("worker_name must be the worker's http(s) base URL")
    return name


class _WorkerNameMixin(BaseModel):
    @field_validator("worker_name", check_fields=False)
    @classmethod
    def _normalize(cls, value: str) -> str:
        return _normalize_worker_name(value)


class RegisterBody(_WorkerNameMixin, RegisterWorkerRequest):
    pass


class HeartbeatBody(_WorkerNameMixin, HeartbeatRequest):
    pass


class UnregisterWorkerRequest(_WorkerNameMixin):
    model_config = ConfigDict(extra="allow")

    worker_name: str


async def _validation_error(
    request: Request, exc: RequestValidationError
) -> JSONResponse:
    errors = exc.errors()
    if any(error.get("type") == "json_invalid" for error in errors):
        return error_response(
            400, "invalid_request_error", "request body is not valid JSON"
        )
    return error_response(422, "invalid_request_error", validation_problems(errors))


def _controller(request: Request) -> Controller:
    return request.app.state.controller


ControllerDep = Annotated[Controller, Depends(_controller)]


def _routes() -> APIRouter:
    router = APIRouter()

    @router.post("/register_worker")
    async def register_worker(body: RegisterBody, controller: ControllerDep) -> Any:
        try:
            await controller.register(body)
        except WorkerUnreachableError as exc:
            return error_response(502, "worker_unreachable", str(exc))
        return {"registered": True}

    @router.post("/unregister_worker")
    async def unregister_worker(
        body: UnregisterWorkerRequest, controller: ControllerDep
    ) -> dict[str, bool]:
        return {"removed": await controller.registry.unregister(body.worker_name)}

    @router.post("/refresh_all_workers")
    async def refresh_all_workers(
        controller: ControllerDep,
    ) -> dict[str, int]:
        await controller.check_all()
        total, healthy = await controller.registry.counts()
        return {"workers": total, "healthy_workers": healthy}

    @router.post("/list_models")
    async def list_models(
        controller: ControllerDep,
    ) -> dict[str, list[str]]:
        return {"models": await controller.registry.models()}

    @router.post("/list_multimodal_models")
    async def list_multimodal_models(
        controller: ControllerDep,
    ) -> dict[str, list[str]]:
        return {"models": await controller.registry.models(multimodal=True)}

    @router.post("/list_language_models")
    async def list_language_models(
        controller: ControllerDep,
    ) -> dict[str, list[str]]:
        return {"models": await controller.registry.models(multimodal=False)}

    @router.post("/get_worker_address")
    async def get_worker_address(
        body: WorkerAddressRequest, controller: ControllerDep
    ) -> dict[str, str]:
        address = await controller.registry.choose(body.model, body.exclude)
        if address is None:
            # FastChat clients test for an empty address.
            return {
                "address": "",
                "error": await controller.no_worker_message(body.model),
            }
        return {"address": address}

    @router.post("/receive_heart_beat")
    async def receive_heart_beat(
        body: HeartbeatBody, controller: ControllerDep
    ) -> dict[str, bool]:
        exist = await controller.registry.heartbeat(body.worker_name, body.queue_length)
        if not exist:
            logger.info("heartbeat from unknown worker %s", body.worker_name)
        return {"exist": exist}

    @router.post("/worker_get_status")
    async def worker_get_status(
        controller: ControllerDep,
    ) -> dict[str, Any]:
        return (await controller.registry.aggregate_status()).model_dump()

    @router.post("/worker_generate_stream")
    async def worker_generate_stream(
        request: Request,
        body: ModelRequest,
        controller: ControllerDep,
    ) -> StreamingResponse:
        # Forward what the client sent, fields we do not know included.
        params = await request.json()
        return StreamingResponse(controller.generate_stream(params))

    @router.get("/test_connection")
    async def test_connection() -> str:
        return "success"

    @router.get("/health")
    async def health(controller: ControllerDep) -> dict[str, Any]:
        total, healthy = await controller.registry.counts()
        return {"status": "ok", "workers": total, "healthy_workers": healthy}

    @router.get("/workers")
    async def workers(controller: ControllerDep) -> dict[str, Any]:
        return {"workers": await controller.registry.describe()}

    return router


def create_app(
    settings: ControllerSettings,
    *,
    probe: WorkerProbe | None = None,
    worker_expiry_s: float | None = None,
) -> FastAPI:
    """The controller app; its lifespan owns the HTTP client and health checks."""
    registry = WorkerRegistry(
        ROUTING_POLICIES[settings.dispatch_method](),
        unhealthy_after_failures=settings.unhealthy_after_failures,
        expiry_s=worker_expiry_s,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Control-plane traffic goes straight to the workers, never via a proxy.
        async with httpx.AsyncClient(
            headers=token_headers(settings.internal_token), trust_env=False
        ) as client:
            controller = Controller(settings, registry, client, probe)
            app.state.controller = controller
            checks = asyncio.create_task(controller.run_health_checks())
            try:
                yield
            finally:
                checks.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await checks

    app = FastAPI(title="qwen-vllm controller", lifespan=lifespan)
    app.add_exception_handler(RequestValidationError, _validation_error)
    guard(app, settings.internal_token)
    app.include_router(_routes())
    return app
