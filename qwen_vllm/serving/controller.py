"""The controller: FastChat's controller protocol, with active health checks.

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
import hmac
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Protocol

import httpx
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, field_validator
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from qwen_vllm.serving.protocol import (
    INTERNAL_TOKEN_HEADER,
    STREAM_DELIMITER,
    ErrorCode,
    HeartbeatRequest,
    ModelRequest,
    RegisterWorkerRequest,
    WorkerAddressRequest,
    WorkerStatus,
    error_chunk,
)
from qwen_vllm.serving.settings import ControllerSettings

logger = logging.getLogger(__name__)

# A worker whose probes have failed for this long is forgotten; it must
# register again (FastChat workers do so when a heartbeat reports exist=false).
WORKER_EXPIRY_S = 30.0
# Shortest probe timeout, for very short health-check intervals.
MIN_PROBE_TIMEOUT_S = 0.5
# Timeout of the status request made when a worker registers without a status.
REGISTER_STATUS_TIMEOUT_S = 5.0
# A worker that refuses the connection is skipped for another, this many times.
MAX_PROXY_ATTEMPTS = 3
PROXY_TIMEOUT = httpx.Timeout(600.0, connect=5.0)

WorkerProbe = Callable[[str], Awaitable[WorkerStatus]]
"""Fetches a worker's status from its base URL; raises when the worker fails."""


@dataclass
class WorkerInfo:
    name: str  # the worker's base URL
    model_names: list[str]
    speed: int
    queue_length: int
    multimodal: bool
    check_heart_beat: bool
    last_heartbeat: float
    healthy: bool = True
    consecutive_failures: int = 0
    failing_since: float | None = None

    def load(self) -> float:
        return self.queue_length / self.speed if self.speed > 0 else float("inf")


class RoutingPolicy(Protocol):
    def choose(self, workers: Sequence[WorkerInfo]) -> WorkerInfo | None:
        """Pick one of the healthy workers serving a model (called under the lock)."""
        ...


class ShortestQueuePolicy:
    """Fewest queued requests per unit of speed; the pick counts as queued at once,
    so a burst spreads over the workers before their next status report."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def choose(self, workers: Sequence[WorkerInfo]) -> WorkerInfo | None:
        if not workers:
            return None
        best = min(worker.load() for worker in workers)
        chosen = self._rng.choice([w for w in workers if w.load() == best])
        chosen.queue_length += 1
        return chosen


class LotteryPolicy:
    """Random, weighted by speed."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def choose(self, workers: Sequence[WorkerInfo]) -> WorkerInfo | None:
        weights = [max(worker.speed, 0) for worker in workers]
        if sum(weights) <= 0:
            return None
        return self._rng.choices(workers, weights=weights)[0]


ROUTING_POLICIES: dict[str, type[ShortestQueuePolicy] | type[LotteryPolicy]] = {
    "shortest_queue": ShortestQueuePolicy,
    "lottery": LotteryPolicy,
}


class WorkerRegistry:
    """The workers known to the controller and their health; asyncio-safe."""

    def __init__(
        self,
        policy: RoutingPolicy,
        *,
        unhealthy_after_failures: int,
        expiry_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._policy = policy
        self._unhealthy_after = unhealthy_after_failures
        self._expiry_s = WORKER_EXPIRY_S if expiry_s is None else expiry_s
        self._clock = clock
        self._workers: dict[str, WorkerInfo] = {}
        self._lock = asyncio.Lock()

    async def register(
        self,
        name: str,
        status: WorkerStatus,
        *,
        check_heart_beat: bool,
        multimodal: bool,
    ) -> None:
        async with self._lock:
            known = name in self._workers
            self._workers[name] = WorkerInfo(
                name=name,
                model_names=list(status.model_names),
                speed=status.speed,
                queue_length=status.queue_length,
                multimodal=multimodal,
                check_heart_beat=check_heart_beat,
                last_heartbeat=self._clock(),
            )
        logger.info(
            "%s worker %s serving %s",
            "re-registered" if known else "registered",
            name,
            status.model_names,
        )

    async def unregister(self, name: str) -> bool:
        async with self._lock:
            removed = self._workers.pop(name, None) is not None
        if removed:
            logger.info("worker %s unregistered", name)
        return removed

    async def heartbeat(self, name: str, queue_length: int) -> bool:
        async with self._lock:
            worker = self._workers.get(name)
            if worker is None:
                return False
            worker.queue_length = queue_length
            worker.last_heartbeat = self._clock()
            return True

    async def record_success(self, name: str, status: WorkerStatus) -> None:
        async with self._lock:
            worker = self._workers.get(name)
            if worker is None:
                return
            recovered = not worker.healthy
            worker.model_names = list(status.model_names)
            worker.speed = status.speed
            worker.queue_length = status.queue_length
            worker.healthy = True
            worker.consecutive_failures = 0
            worker.failing_since = None
        if recovered:
            logger.info("worker %s is healthy again", name)

    async def record_failure(self, name: str, reason: str) -> None:
        now = self._clock()
        async with self._lock:
            worker = self._workers.get(name)
            if worker is None:
                return
            worker.consecutive_failures += 1
            if worker.failing_since is None:
                worker.failing_since = now
            became_unhealthy = (
                worker.healthy and worker.consecutive_failures >= self._unhealthy_after
            )
            if became_unhealthy:
                worker.healthy = False
            # A worker that sends no heartbeats would never learn it was dropped.
            expired = (
                worker.check_heart_beat and now - worker.failing_since >= self._expiry_s
            )
            if expired:
                del self._workers[name]
            failures = worker.consecutive_failures
        logger.debug(
            "probe of worker %s failed (%d in a row): %s", name, failures, reason
        )
        if became_unhealthy:
            logger.warning(
                "worker %s gets no traffic after %d failed probes: %s",
                name,
                failures,
                reason,
            )
        if expired:
            logger.warning(
                "worker %s removed after failing for %.0f s", name, self._expiry_s
            )

    async def choose(self, model: str, exclude: Sequence[str] = ()) -> str | None:
        async with self._lock:
            candidates = [
                worker
                for worker in self._workers.values()
                if worker.healthy
                and model in worker.model_names
                and worker.name not in exclude
            ]
            chosen = self._policy.choose(candidates)
            return chosen.name if chosen else None

    async def names(self) -> list[str]:
        async with self._lock:
            return list(self._workers)

    async def models(self, *, multimodal: bool | None = None) -> list[str]:
        """Models of every registered worker, healthy or not.

        A model whose workers are all failing stays listed until they expire:
        clients then get "no healthy worker right now" (retry later), not
        "unknown model".
        """
        async with self._lock:
            return sorted(
                {
                    model
                    for worker in self._workers.values()
                    if multimodal is None or worker.multimodal == multimodal
                    for model in worker.model_names
                }
            )

    async def aggregate_status(self) -> WorkerStatus:
        async with self._lock:
            healthy = [w for w in self._workers.values() if w.healthy]
            return WorkerStatus(
                model_names=sorted({m for w in healthy for m in w.model_names}),
                speed=sum(w.speed for w in healthy),
                queue_length=sum(w.queue_length for w in healthy),
            )

    async def counts(self) -> tuple[int, int]:
        async with self._lock:
            workers = self._workers.values()
            return len(workers), sum(1 for w in workers if w.healthy)

    async def describe(self) -> list[dict[str, Any]]:
        now = self._clock()
        async with self._lock:
            return [
                {
                    "name": w.name,
                    "models": list(w.model_names),
                    "speed": w.speed,
                    "queue_length": w.queue_length,
                    "multimodal": w.multimodal,
                    "check_heart_beat": w.check_heart_beat,
                    "healthy": w.healthy,
                    "consecutive_failures": w.consecutive_failures,
                    "last_heartbeat_age_s": round(now - w.last_heartbeat, 3),
                }
                for w in self._workers.values()
            ]


class WorkerUnreachableError(RuntimeError):
    """A registering worker's status could not be fetched."""


class Controller:
    """The service behind the routes: registration, health checks, dispatch."""

    def __init__(
        self,
        settings: ControllerSettings,
        registry: WorkerRegistry,
        client: httpx.AsyncClient,
        probe: WorkerProbe | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self._client = client
        self._probe = probe or self._http_probe
        self._probe_timeout = max(settings.health_check_interval, MIN_PROBE_TIMEOUT_S)

    async def _http_probe(self, worker_url: str) -> WorkerStatus:
        response = await self._client.post(
            worker_url + "/worker_get_status", timeout=self._probe_timeout
        )
        response.raise_for_status()
        return WorkerStatus.model_validate(response.json())

    async def register(self, request: RegisterWorkerRequest) -> None:
        status = request.worker_status
        if status is None:
            try:
                status = await asyncio.wait_for(
                    self._probe(request.worker_name), REGISTER_STATUS_TIMEOUT_S
                )
            except Exception as exc:
                raise WorkerUnreachableError(
                    f"cannot get the status of worker {request.worker_name}: "
                    f"{_describe(exc)}"
                ) from exc
        await self.registry.register(
            request.worker_name,
            status,
            check_heart_beat=request.check_heart_beat,
            multimodal=request.multimodal,
        )

    async def check_all(self) -> None:
        """Probe every worker once, concurrently."""
        names = await self.registry.names()
        await asyncio.gather(*(self._check(name) for name in names))

    async def _check(self, name: str) -> None:
        try:
            status = await asyncio.wait_for(self._probe(name), self._probe_timeout)
        except Exception as exc:
            await self.registry.record_failure(name, _describe(exc))
        else:
            await self.registry.record_success(name, status)

    async def run_health_checks(self) -> None:
        while True:
            await asyncio.sleep(self.settings.health_check_interval)
            try:
                await self.check_all()
            except Exception:
                logger.exception("health check round failed")

    async def no_worker_message(self, model: str) -> str:
        models = await self.registry.models()
        if model in models:
            return (
                f"no healthy worker serves model {model!r} right now (its workers "
                "are failing health checks or restarting); retry shortly"
            )
        available = ", ".join(models) if models else "none"
        return f"no worker serves model {model!r}; models available: {available}"

    async def generate_stream(self, params: dict[str, Any]) -> AsyncIterator[bytes]:
        """Proxy a worker's NUL-delimited stream, skipping workers that refuse."""
        model = params["model"]
        tried: list[str] = []
        for _ in range(MAX_PROXY_ATTEMPTS):
            address = await self.registry.choose(model, exclude=tried)
            if address is None:
                break
            tried.append(address)
            try:
                async with self._client.stream(
                    "POST",
                    address + "/worker_generate_stream",
                    json=params,
                    timeout=PROXY_TIMEOUT,
                ) as response:
                    if response.status_code != 200:
                        yield await _worker_http_error(address, response)
                        return
                    async for piece in _split_stream(response.aiter_bytes()):
                        yield piece
                    return
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                # Nothing was sent to the client yet: another worker can serve.
                logger.warning("worker %s unreachable: %s", address, _describe(exc))
                await self.registry.record_failure(address, _describe(exc))
            except httpx.HTTPError as exc:
                logger.warning("stream from worker %s failed: %s", address, exc)
                yield error_chunk(
                    ErrorCode.CONTROLLER_WORKER_TIMEOUT,
                    f"worker {address} failed: {_describe(exc)}",
                ).encode()
                return
        if tried:
            yield error_chunk(
                ErrorCode.CONTROLLER_WORKER_TIMEOUT,
                f"no worker serving model {model!r} could be reached; tried "
                + ", ".join(tried),
            ).encode()
            return
        message = await self.no_worker_message(model)
        logger.info("%s", message)
        yield error_chunk(ErrorCode.CONTROLLER_NO_WORKER, message).encode()


async def _split_stream(byte_chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Whole NUL-terminated pieces only: a worker dying mid-piece sends no junk."""
    buffer = b""
    async for raw in byte_chunks:
        buffer += raw
        *pieces, buffer = buffer.split(STREAM_DELIMITER)
        for piece in pieces:
            if piece:
                yield piece + STREAM_DELIMITER
    if buffer.strip():
        yield buffer + STREAM_DELIMITER


async def _worker_http_error(address: str, response: httpx.Response) -> bytes:
    body = (await response.aread())[:500].decode(errors="replace")
    code = (
        ErrorCode.VALIDATION_TYPE_ERROR
        if response.status_code in (400, 422)
        else ErrorCode.INTERNAL_ERROR
    )
    logger.warning("worker %s answered HTTP %d", address, response.status_code)
    return error_chunk(
        code, f"worker {address} answered HTTP {response.status_code}: {body}"
    ).encode()


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


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


def _error_response(status: int, kind: str, message: str) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": kind, "code": status}},
        status_code=status,
    )


class InternalTokenMiddleware:
    """Requires the deployment's internal token on everything but GET /health."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self._app = app
        self._token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not (
            scope["path"] == "/health" and scope["method"] in ("GET", "HEAD")
        ):
            given = Headers(scope=scope).get(INTERNAL_TOKEN_HEADER, "")
            if not hmac.compare_digest(given.encode(), self._token):
                response = _error_response(
                    401,
                    "authentication_error",
                    f"missing or wrong {INTERNAL_TOKEN_HEADER} header",
                )
                await response(scope, receive, send)
                return
        await self._app(scope, receive, send)


async def _validation_error(
    request: Request, exc: RequestValidationError
) -> JSONResponse:
    errors = exc.errors()
    if any(error.get("type") == "json_invalid" for error in errors):
        return _error_response(
            400, "invalid_request_error", "request body is not valid JSON"
        )
    problems = "; ".join(
        "{}: {}".format(
            ".".join(str(part) for part in error.get("loc", ()) if part != "body")
            or "body",
            error.get("msg", "invalid"),
        )
        for error in errors
    )
    return _error_response(422, "invalid_request_error", problems)


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
            return _error_response(502, "worker_unreachable", str(exc))
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
    token = (
        settings.internal_token.get_secret_value() if settings.internal_token else None
    )
    registry = WorkerRegistry(
        ROUTING_POLICIES[settings.dispatch_method](),
        unhealthy_after_failures=settings.unhealthy_after_failures,
        expiry_s=worker_expiry_s,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        headers = {INTERNAL_TOKEN_HEADER: token} if token else {}
        # Control-plane traffic goes straight to the workers, never via a proxy.
        async with httpx.AsyncClient(headers=headers, trust_env=False) as client:
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
    if token:
        app.add_middleware(InternalTokenMiddleware, token=token)
    app.include_router(_routes())
    return app


def run_controller(settings: ControllerSettings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logger.info(
        "controller on %s:%d, dispatch %s",
        settings.host,
        settings.controller_port,
        settings.dispatch_method,
    )
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.controller_port,
        log_level=settings.log_level,
    )
