"""The one client of the controller and its workers (FastChat protocol).

The gateway and the web UI both talk to the control plane through
ControllerClient; its owner creates the httpx.AsyncClient and closes it.

Failures before a worker produced anything are retried on another worker
(the failed addresses are sent to the controller as `exclude`, an extension
FastChat's controller ignores, and skipped when it returns them anyway). Once
chunks have flowed, a broken or silent stream ends with an error chunk: every
read has a timeout, so a dead worker never hangs a caller.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Collection
from typing import Any, Protocol, runtime_checkable

import httpx
from cachetools import TLRUCache, TTLCache
from pydantic import BaseModel, ConfigDict, SecretStr, ValidationError

from qwen_vllm.serving.protocol import (
    ChatDefaults,
    ErrorCode,
    GenerateChunk,
    GenerateParams,
    error_chunk,
    iter_stream_chunks,
)
from qwen_vllm.serving.security import token_headers

logger = logging.getLogger(__name__)

# Controller calls are cheap; a controller that does not answer in this time
# is down.
CONTROLLER_TIMEOUT = 10.0
# Times the controller is asked for a worker other than the failed ones.
_LOOKUPS_PER_ATTEMPT = 3
# How long a failed /model_details lookup is remembered.
_UNKNOWN_DETAILS_TTL = 10.0


class BackendError(Exception):
    """The control plane could not serve a request."""


class ControllerUnavailableError(BackendError):
    """The controller did not answer or answered nonsense."""


class NoWorkerError(BackendError):
    """The controller knows no healthy worker for the model (right now)."""


class UnknownModelError(BackendError):
    def __init__(self, model: str) -> None:
        super().__init__(f"The model {model!r} does not exist.")
        self.model = model


class WorkerError(BackendError):
    """Workers failed before producing an answer, after the allowed retries."""


class WorkerTimeoutError(WorkerError):
    """A worker accepted the request but did not answer in time."""


class ModelDetails(BaseModel):
    model_config = ConfigDict(extra="allow")

    context_length: int | None = None
    chat_defaults: ChatDefaults | None = None  # our workers' extension
    parent: str | None = None  # ours too: the model a LoRA adapter runs on


class WorkerInfo(BaseModel):
    """One worker as the controller's GET /workers reports it."""

    model_config = ConfigDict(extra="allow")

    address: str
    model_names: list[str] = []
    queue_length: int = 0
    healthy: bool = True

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> WorkerInfo:
        status = raw.get("worker_status") or {}
        names = raw.get("model_names") or raw.get("models") or status.get("model_names")
        healthy = raw.get("healthy", raw.get("health", True))
        if isinstance(healthy, str):
            healthy = healthy.lower() in ("ok", "healthy", "true", "up")
        return cls(
            address=raw.get("address") or raw.get("worker_name") or raw.get("name"),
            model_names=names or [],
            queue_length=raw.get("queue_length", status.get("queue_length", 0)),
            healthy=bool(healthy),
        )


class Backend(Protocol):
    """What the gateway and the web UI need from the control plane.

    ControllerClient implements it (and WorkerStatusSource); tests pass fakes.
    A request that cannot start raises a BackendError subclass.
    """

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

    async def workers(self, *, fresh: bool = False) -> list[WorkerInfo]: ...


@runtime_checkable
class WorkerAdmin(WorkerStatusSource, Protocol):
    """Optional: backends that can call each worker (adapter loading)."""

    async def post_worker(
        self, address: str, path: str, body: dict[str, Any]
    ) -> httpx.Response: ...

    def forget(self, model: str) -> None: ...


class ControllerClient:
    """Controller lookups and worker calls, with retries and timeouts."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        controller_url: str,
        *,
        internal_token: SecretStr | str | None = None,
        request_timeout: float = 600.0,
        connect_timeout: float = 5.0,
        max_attempts: int = 3,
        details_ttl: float = 60.0,
        workers_ttl: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._http = http
        self._controller = controller_url.rstrip("/")
        self._headers = token_headers(internal_token)
        self._worker_timeout = httpx.Timeout(
            request_timeout,
            connect=connect_timeout,
            write=connect_timeout,
            pool=connect_timeout,
        )
        self._max_attempts = max(1, max_attempts)
        self._details_ttl = details_ttl
        # model -> (details, seconds to keep them)
        self._details: TLRUCache[str, tuple[ModelDetails, float]] = TLRUCache(
            maxsize=1024, ttu=lambda _, entry, now: now + entry[1], timer=clock
        )
        self._workers: TTLCache[str, list[WorkerInfo]] = TTLCache(
            maxsize=1, ttl=workers_ttl, timer=clock
        )

    @classmethod
    def from_settings(cls, http: httpx.AsyncClient, settings: Any) -> ControllerClient:
        """From any service settings with controller_url() and internal_token."""
        return cls(
            http,
            settings.controller_url(),
            internal_token=settings.internal_token,
            request_timeout=getattr(settings, "request_timeout", 600.0),
        )

    # Controller

    async def list_models(self) -> list[str]:
        reply = await self._controller_call("POST", "/list_models")
        models = reply.get("models")
        if not isinstance(models, list):
            raise ControllerUnavailableError("The controller sent no model list.")
        return [str(model) for model in models]

    async def worker_address(self, model: str, *, exclude: Collection[str] = ()) -> str:
        body: dict[str, Any] = {"model": model}
        if exclude:
            body["exclude"] = sorted(exclude)
        reply = await self._controller_call("POST", "/get_worker_address", body)
        address = reply.get("address") or ""
        if address:
            return str(address).rstrip("/")
        models = await self.list_models()
        # No model at all: the controller has just restarted (workers not yet
        # registered again) or every worker is down; that is an outage, not
        # a model that does not exist.
        if models and model not in models:
            raise UnknownModelError(model)
        raise NoWorkerError(
            str(reply.get("error") or f"No healthy worker serves {model!r} right now.")
        )

    async def workers(self, *, fresh: bool = False) -> list[WorkerInfo]:
        """Every worker with its queue length and health; cached briefly
        unless `fresh`."""
        if not fresh and (cached := self._workers.get("all")) is not None:
            return cached
        reply = await self._controller_call("GET", "/workers")
        raw = reply.get("workers", reply) if isinstance(reply, dict) else reply
        if isinstance(raw, dict):  # {address: {...}}
            raw = [{"address": key, **value} for key, value in raw.items()]
        try:
            workers = [WorkerInfo.parse(item) for item in raw]
        except (TypeError, AttributeError, ValidationError) as exc:
            raise ControllerUnavailableError(
                "The controller's worker list is malformed."
            ) from exc
        self._workers["all"] = workers
        return workers

    async def _controller_call(
        self, method: str, path: str, body: dict[str, Any] | None = None
    ) -> Any:
        """One lookup; each is read-only, so it is safe to send twice."""
        failure: Exception | None = None
        for _ in range(2):
            try:
                response = await self._http.request(
                    method,
                    self._controller + path,
                    json=body,
                    headers=self._headers,
                    timeout=CONTROLLER_TIMEOUT,
                )
                response.raise_for_status()
                return response.json()
            except httpx.TimeoutException as exc:  # too slow: not asked twice
                failure = exc
                break
            except httpx.TransportError as exc:
                # A pooled connection the controller has just closed for being
                # idle fails before any answer: ask again, on a new connection.
                failure = exc
            except (httpx.HTTPError, ValueError) as exc:
                failure = exc
                break
        logger.warning("Controller call %s failed: %r", path, failure)
        raise ControllerUnavailableError(
            "The controller is unreachable or failed."
        ) from failure

    async def _pick_worker(self, model: str, failed: list[str]) -> str:
        address = ""
        for _ in range(_LOOKUPS_PER_ATTEMPT):
            address = await self.worker_address(model, exclude=failed)
            if address not in failed:
                return address
        return address  # only failed ones left: they may have recovered

    # Workers

    def _timeout_error(self) -> WorkerTimeoutError:
        return WorkerTimeoutError(
            f"The worker did not answer within {self._worker_timeout.read} s."
        )

    async def generate_stream(
        self, model: str, params: GenerateParams
    ) -> AsyncIterator[GenerateChunk]:
        """Chunks of one generation; raises BackendError if none could start."""
        body = _body(model, params)
        failover = _Failover(self, model)
        async for address in failover:
            started = False
            try:
                async with self._http.stream(
                    "POST",
                    address + "/worker_generate_stream",
                    json=body,
                    headers=self._headers,
                    timeout=self._worker_timeout,
                ) as response:
                    if response.status_code != httpx.codes.OK:
                        raise WorkerError(f"HTTP {response.status_code}")
                    async for data in iter_stream_chunks(response.aiter_bytes()):
                        chunk = GenerateChunk.model_validate(data)
                        started = True
                        yield chunk
                if started:
                    return
                raise WorkerError("the stream ended without output")
            except (httpx.HTTPError, WorkerError, ValueError) as exc:
                logger.warning("Worker %s failed: %r", address, exc)
                if started and _timed_out(exc):
                    yield error_chunk(
                        ErrorCode.CONTROLLER_WORKER_TIMEOUT,
                        "The worker stopped sending output.",
                    )
                    return
                if started:
                    yield error_chunk(
                        ErrorCode.INTERNAL_ERROR, "The worker's stream broke off."
                    )
                    return
                failover.failed(address, exc)
        raise failover.exhausted() from failover.problem

    async def generate(self, model: str, params: GenerateParams) -> GenerateChunk:
        """The whole generation in one chunk (/worker_generate)."""
        data = await self._worker_call(model, "/worker_generate", _body(model, params))
        try:
            return GenerateChunk.model_validate(data)
        except ValidationError as exc:
            raise WorkerError("The worker sent a malformed answer.") from exc

    async def model_details(self, model: str) -> ModelDetails:
        """The model's context length (None when the workers cannot tell).

        Cached for details_ttl seconds; raises only when no worker serves the
        model at all.
        """
        if (cached := self._details.get(model)) is not None:
            return cached[0]
        try:
            data = await self._worker_call(model, "/model_details", {"model": model})
            details = ModelDetails.model_validate(data)
        except (WorkerError, ValidationError) as exc:
            # Workers without /model_details (FastChat's) would otherwise cost
            # every request a round of retries.
            logger.warning("No model details for %s: %r", model, exc)
            details, ttl = ModelDetails(), min(self._details_ttl, _UNKNOWN_DETAILS_TTL)
        else:
            ttl = self._details_ttl
        self._details[model] = (details, ttl)
        return details

    async def post_worker(
        self, address: str, path: str, body: dict[str, Any]
    ) -> httpx.Response:
        """One call to one worker, whatever it answers (raises httpx.HTTPError
        when there is no answer)."""
        return await self._http.post(
            address + path,
            json=body,
            headers=self._headers,
            timeout=self._worker_timeout,
        )

    def forget(self, model: str) -> None:
        """Drop what is cached about a model whose workers changed."""
        self._details.pop(model, None)
        self._workers.pop("all", None)

    async def _worker_call(self, model: str, path: str, body: dict[str, Any]) -> Any:
        failover = _Failover(self, model)
        async for address in failover:
            try:
                response = await self._http.post(
                    address + path,
                    json=body,
                    headers=self._headers,
                    timeout=self._worker_timeout,
                )
                response.raise_for_status()
                return response.json()
            except (httpx.HTTPError, ValueError) as exc:
                logger.warning("Worker %s failed on %s: %r", address, path, exc)
                failover.failed(address, exc)
        raise failover.exhausted() from failover.problem


class _Failover:
    """The workers one request tries: after a worker fails without answering,
    the next attempt asks the controller for another one.

    A worker that accepted the request and then went silent may still be
    working on it, so a timeout ends the request instead of doubling it.
    """

    def __init__(self, client: ControllerClient, model: str) -> None:
        self._client = client
        self._model = model
        self._tried: list[str] = []
        self.problem: BaseException | None = None

    async def __aiter__(self) -> AsyncIterator[str]:
        for _ in range(self._client._max_attempts):
            yield await self._client._pick_worker(self._model, self._tried)

    def failed(self, address: str, exc: BaseException) -> None:
        if _timed_out(exc):
            raise self._client._timeout_error() from exc
        self._tried.append(address)
        self.problem = exc

    def exhausted(self) -> WorkerError:
        return WorkerError(
            f"No worker could serve {self._model!r} ({len(self._tried)} tried)."
        )


def _timed_out(exc: BaseException) -> bool:
    """A worker that accepted the request but went silent (not one that
    could not be reached)."""
    return isinstance(exc, httpx.TimeoutException) and not isinstance(
        exc, httpx.ConnectTimeout
    )


def _body(model: str, params: GenerateParams) -> dict[str, Any]:
    # Only what the caller set: a worker applies its model's own defaults.
    body = params.model_dump(mode="json", exclude_unset=True)
    body.setdefault("model", model)
    return body
