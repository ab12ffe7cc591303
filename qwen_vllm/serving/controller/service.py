"""The controller's service: registration, health checks and stream dispatch.

Probes every worker each `health_check_interval` seconds over HTTP and proxies
a worker's NUL-delimited stream to the caller, trying another worker when one
refuses the connection. With an internal token, each probe carries a fresh
challenge, and only a worker whose answer proves the token gets traffic.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx

from qwen_vllm.serving.controller.registry import WorkerRegistry
from qwen_vllm.serving.protocol import (
    STREAM_DELIMITER,
    ErrorCode,
    RegisterWorkerRequest,
    WorkerStatus,
    error_chunk,
    iter_stream_pieces,
)
from qwen_vllm.serving.security import (
    CHALLENGE_HEADER,
    PROOF_HEADER,
    proves_token,
    secret_value,
)
from qwen_vllm.serving.settings import ControllerSettings

logger = logging.getLogger(__name__)

# Shortest probe timeout, for very short health-check intervals.
MIN_PROBE_TIMEOUT_S = 0.5
# Timeout of the status request made when a worker registers without a status.
REGISTER_STATUS_TIMEOUT_S = 5.0
# A worker that refuses the connection is skipped for another, this many times.
MAX_PROXY_ATTEMPTS = 3
PROXY_TIMEOUT = httpx.Timeout(600.0, connect=5.0)

WorkerProbe = Callable[[str], Awaitable[WorkerStatus]]
"""Fetches a worker's status from its base URL; raises when the worker fails."""


class WorkerUnreachableError(RuntimeError):
    """A registering worker's status could not be fetched."""


class WorkerNotProvenError(RuntimeError):
    """A worker's answer to a probe lacked the proof of the internal token."""


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
        self._token = secret_value(settings.internal_token)
        # Probes of just-registered workers, kept so they are not collected.
        self._proving: set[asyncio.Task] = set()
        self._probe_timeout = max(settings.health_check_interval, MIN_PROBE_TIMEOUT_S)

    async def _http_probe(self, worker_url: str) -> WorkerStatus:
        """The worker's status; with an internal token, only from a worker that
        answers the probe's challenge with the proof that it knows the token."""
        challenge = secrets.token_hex(16)
        response = await self._client.post(
            worker_url + "/worker_get_status",
            headers={CHALLENGE_HEADER: challenge} if self._token else None,
            timeout=self._probe_timeout,
        )
        response.raise_for_status()
        if self._token and not proves_token(
            self._token, challenge, response.headers.get(PROOF_HEADER)
        ):
            raise WorkerNotProvenError(
                f"{worker_url} answered without proof of the internal token: it "
                "is not a worker of this deployment"
            )
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
                    f"{describe(exc)}"
                ) from exc
        # A status the caller sent is its claim; with a token, the worker gets
        # traffic once a probe has seen it prove the token.
        unproven = request.worker_status is not None and bool(self._token)
        await self.registry.register(
            request.worker_name,
            status,
            check_heart_beat=request.check_heart_beat,
            multimodal=request.multimodal,
            proven=not unproven,
        )
        if unproven:
            task = asyncio.create_task(self._check(request.worker_name))
            self._proving.add(task)
            task.add_done_callback(self._proving.discard)

    async def check_all(self) -> None:
        """Probe every worker once, concurrently."""
        names = await self.registry.names()
        await asyncio.gather(*(self._check(name) for name in names))

    async def _check(self, name: str) -> None:
        try:
            status = await asyncio.wait_for(self._probe(name), self._probe_timeout)
        except Exception as exc:
            await self.registry.record_failure(name, describe(exc))
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
                    async for piece in iter_stream_pieces(response.aiter_bytes()):
                        yield piece + STREAM_DELIMITER
                    return
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                # Nothing was sent to the client yet: another worker can serve.
                logger.warning("worker %s unreachable: %s", address, describe(exc))
                await self.registry.record_failure(address, describe(exc))
            except httpx.HTTPError as exc:
                logger.warning("stream from worker %s failed: %s", address, exc)
                yield error_chunk(
                    ErrorCode.CONTROLLER_WORKER_TIMEOUT,
                    f"worker {address} failed: {describe(exc)}",
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


def describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
