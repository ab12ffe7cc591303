"""A FastChat-protocol model worker around an engine (vLLM in production).

The app only speaks HTTP; everything about generation sits behind `Engine`,
so tests run the same routes over a fake engine.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Protocol

import httpx
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from qwen_vllm.checkpoints.adapters import AdapterRefused
from qwen_vllm.serving.protocol import (
    QWEN_CONV_TEMPLATE,
    ChatDefaults,
    ErrorCode,
    GenerateChunk,
    GenerateParams,
    error_chunk,
    validation_problems,
)
from qwen_vllm.serving.security import guard, reachable_host, token_headers
from qwen_vllm.serving.settings import WorkerSettings

logger = logging.getLogger(__name__)


class Engine(Protocol):
    """What the worker needs from a model engine."""

    context_length: int
    chat_defaults: ChatDefaults
    generation_defaults: str  # every default, as the start log shows them

    def queue_length(self) -> int: ...

    def count_tokens(self, text: str) -> int: ...

    def generate(self, params: GenerateParams) -> AsyncIterator[GenerateChunk]: ...

    async def check_health(self) -> None: ...

    async def load_adapter(self, name: str, path: str) -> None:
        """Serve a LoRA adapter as `name`; raises AdapterRefused."""
        ...

    async def unload_adapter(self, name: str) -> None:
        """Stop serving it, once its requests have ended; KeyError if unknown."""
        ...


def worker_url(settings: WorkerSettings) -> str:
    if settings.worker_address:
        return settings.worker_address.rstrip("/")
    return f"http://{reachable_host(settings.host)}:{settings.worker_port}"


class ControllerLink:
    """Registration and heartbeats: keeps this worker known to the controller."""

    def __init__(
        self,
        settings: WorkerSettings,
        engine: Engine,
        client: httpx.AsyncClient,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.client = client
        self.url = worker_url(settings)
        # The model's names, then its adapters': the controller routes each.
        self.model_names = settings.served_model_names() + list(settings.lora_paths())
        self.headers = token_headers(settings.internal_token)
        # Set when the names changed and the controller could not be told.
        self.stale = False
        self.registering = True  # False: an app that stays unregistered (tests)

    def status(self) -> dict:
        return {
            "model_names": self.model_names,
            "speed": 1,
            "queue_length": self.engine.queue_length(),
        }

    async def register(self) -> None:
        await self._post(
            "/register_worker",
            {
                "worker_name": self.url,
                "check_heart_beat": True,
                "worker_status": self.status(),
                "multimodal": False,
            },
        )
        logger.info(
            "registered %s (%s) with the controller", self.url, self.model_names
        )

    async def heartbeat_forever(self) -> None:
        registered = False
        while True:
            try:
                if not registered or self.stale:
                    await self.register()
                    registered, self.stale = True, False
                else:
                    reply = await self._post(
                        "/receive_heart_beat",
                        {
                            "worker_name": self.url,
                            "queue_length": self.engine.queue_length(),
                        },
                    )
                    # The controller forgot us (restart, or we were unreachable).
                    registered = bool(reply.get("exist"))
            except (httpx.HTTPError, ValueError) as exc:
                registered = False
                logger.warning("controller unreachable: %s", exc)
            await asyncio.sleep(self.settings.heartbeat_interval if registered else 1.0)

    async def names_changed(self) -> None:
        """Tell the controller at once (it routes a name only to workers that
        have it); if it cannot be told now, the next heartbeat does."""
        if not self.registering:
            return
        self.stale = True
        try:
            await self.register()
            self.stale = False
        except (httpx.HTTPError, ValueError) as exc:
            logger.warning("controller not told of %s yet: %s", self.model_names, exc)

    async def unregister(self) -> None:
        with contextlib.suppress(httpx.HTTPError):
            await self._post("/unregister_worker", {"worker_name": self.url})

    async def _post(self, path: str, body: dict) -> dict:
        response = await self.client.post(
            self.settings.controller_url() + path,
            json=body,
            headers=self.headers,
            timeout=5.0,
        )
        response.raise_for_status()
        return response.json()


async def watch_engine(engine: Engine, interval: float = 5.0) -> None:
    """Exit when the engine has died: the supervisor (Ray, Kubernetes) restarts
    the worker, which is the only way back to a working engine."""
    while True:
        await asyncio.sleep(interval)
        try:
            await engine.check_health()
        except Exception:
            logger.exception("the engine died; exiting so the worker is restarted")
            logging.shutdown()
            os._exit(1)


def create_app(
    settings: WorkerSettings, engine: Engine, *, register: bool = True
) -> FastAPI:
    """The worker's HTTP app; registers with the controller while it runs."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async with httpx.AsyncClient() as client:
            link = ControllerLink(settings, engine, client)
            link.registering = register
            app.state.link = link
            tasks = [asyncio.create_task(watch_engine(engine))]
            if register:
                tasks.append(asyncio.create_task(link.heartbeat_forever()))
            try:
                yield
            finally:
                for task in tasks:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                if register:
                    await link.unregister()

    app = FastAPI(title="qwen_vllm worker", lifespan=lifespan)
    model_name = settings.served_model_name()
    served = {"requests": 0, "cancelled": 0}
    # Ids of streams whose client left before the end (their engine requests
    # were aborted): the evidence a caller can check for its own request.
    recently_cancelled: collections.deque[str] = collections.deque(maxlen=32)

    guard(app, settings.internal_token)

    async def read_params(request: Request) -> GenerateParams | GenerateChunk:
        try:
            params = GenerateParams.model_validate_json(await request.body())
        except ValidationError as exc:
            return error_chunk(
                ErrorCode.VALIDATION_TYPE_ERROR, validation_problems(exc.errors())
            )
        names = request.app.state.link.model_names
        if params.model and params.model not in names:
            # An adapter unloaded after the controller picked this worker:
            # never answered by the base model instead.
            return error_chunk(
                ErrorCode.INVALID_MODEL,
                f"This worker does not serve {params.model!r} (it serves "
                f"{', '.join(names)}).",
            )
        return params

    @app.post("/worker_generate_stream")
    async def generate_stream(request: Request) -> StreamingResponse:
        params = await read_params(request)
        served["requests"] += 1
        if isinstance(params, GenerateChunk):
            return StreamingResponse(iter([params.encode()]))

        async def body() -> AsyncIterator[bytes]:
            # Starlette cancels this generator when the client disconnects;
            # closing the engine stream then aborts the engine request.
            stream = engine.generate(params)
            ended = False
            try:
                async for chunk in stream:
                    ended = chunk.finish_reason is not None
                    yield chunk.encode()
            finally:
                await stream.aclose()
                if not ended:
                    served["cancelled"] += 1
                    recently_cancelled.append(params.request_id or "")

        return StreamingResponse(body(), media_type="application/octet-stream")

    @app.post("/worker_generate")
    async def generate(request: Request) -> JSONResponse:
        params = await read_params(request)
        served["requests"] += 1
        if isinstance(params, GenerateChunk):
            return JSONResponse(params.model_dump(exclude_none=True))
        last = GenerateChunk()
        async for chunk in engine.generate(params):
            last = chunk
        return JSONResponse(last.model_dump(exclude_none=True))

    @app.post("/worker_get_status")
    async def get_status(request: Request) -> JSONResponse:
        try:
            await engine.check_health()
        except Exception as exc:  # the controller's probe: take us out of routing
            return JSONResponse({"error": f"engine unhealthy: {exc}"}, 503)
        return JSONResponse(request.app.state.link.status())

    @app.post("/count_token")
    async def count_token(request: Request) -> dict:
        body = await _json_body(request)
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            return {"count": 0, "error_code": int(ErrorCode.VALIDATION_TYPE_ERROR)}
        return {"count": engine.count_tokens(prompt), "error_code": 0}

    @app.post("/worker_get_conv_template")
    async def get_conv_template() -> dict:
        from fastchat.conversation import get_conv_template

        return {"conv": jsonable_encoder(get_conv_template(QWEN_CONV_TEMPLATE))}

    own_names = set(settings.served_model_names())

    def is_adapter(request: Request, name: object) -> bool:
        """An adapter this worker serves: --lora ones and those loaded since
        (every name it registers that is not the model's own)."""
        return name in request.app.state.link.model_names and name not in own_names

    @app.post("/load_lora_adapter")
    async def load_lora_adapter(request: Request) -> JSONResponse:
        body = await _json_body(request)
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or not name or not isinstance(path, str):
            return _refusal(400, "lora_name and lora_path (strings) are required")
        link: ControllerLink = request.app.state.link
        if name in link.model_names:
            return _refusal(400, f"{name!r} is already served by this worker")
        try:
            await engine.load_adapter(name, path)
        except AdapterRefused as exc:
            return _refusal(400, str(exc))
        link.model_names.append(name)
        await link.names_changed()
        return JSONResponse({"model_names": link.model_names})

    @app.post("/unload_lora_adapter")
    async def unload_lora_adapter(request: Request) -> JSONResponse:
        name = (await _json_body(request)).get("lora_name")
        if not is_adapter(request, name):
            return _refusal(404, f"no LoRA adapter {name!r} is loaded here")
        link: ControllerLink = request.app.state.link
        # Out of routing first, then out of the engine once its requests end.
        link.model_names.remove(name)
        await link.names_changed()
        await engine.unload_adapter(name)
        return JSONResponse({"model_names": link.model_names})

    @app.post("/model_details")
    async def model_details(request: Request) -> dict:
        asked = (await _json_body(request)).get("model")
        return {
            "context_length": engine.context_length,
            "model": model_name,
            "chat_defaults": engine.chat_defaults.model_dump(),
            "generation_defaults": engine.generation_defaults,
            "parent": model_name if is_adapter(request, asked) else None,
        }

    @app.get("/health")
    async def health() -> JSONResponse:
        try:
            await engine.check_health()
        except Exception as exc:  # a dead engine: report, do not raise
            return JSONResponse({"status": "error", "detail": str(exc)}, 503)
        return JSONResponse(
            {
                "status": "ok",
                "model": model_name,
                "queue_length": engine.queue_length(),
                "requests_total": served["requests"],
                "cancelled_total": served["cancelled"],
                "recently_cancelled": list(recently_cancelled),
                "pid": os.getpid(),
            }
        )

    return app


def _refusal(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status)


async def _json_body(request: Request) -> dict:
    try:
        body = await request.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}
