"""Run one service (controller, worker, gateway or web UI) with uvicorn.

The same runner serves `qwen-vllm controller|worker|gateway|webui` in the
foreground and each Ray actor of `qwen-vllm serve` in a thread, so a service
starts, stops and logs the same way wherever it runs.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI

from qwen_vllm.serving.settings import (
    ControllerSettings,
    GatewaySettings,
    WebUISettings,
    WorkerSettings,
    _Settings,
)

logger = logging.getLogger(__name__)

AppFactory = Callable[[Any], Awaitable[tuple[FastAPI, Callable[[], None] | None]]]


async def _controller(settings: ControllerSettings):
    from qwen_vllm.serving.controller import create_app

    return create_app(settings), None


async def _worker(settings: WorkerSettings):
    from qwen_vllm.serving.worker.app import create_app
    from qwen_vllm.serving.worker.engine import VllmEngine

    # Started inside the running loop: AsyncLLM binds its output handler to it.
    engine = VllmEngine.start(settings)
    return create_app(settings, engine), engine.shutdown


async def _gateway(settings: GatewaySettings):
    from qwen_vllm.serving.gateway import create_app

    return create_app(settings), None


async def _webui(settings: WebUISettings):
    from qwen_vllm.serving.webui import create_app

    return create_app(settings), None


@dataclass(frozen=True)
class ServiceKind:
    settings_cls: type[_Settings]
    factory: AppFactory
    port_field: str


SERVICES: dict[str, ServiceKind] = {
    "controller": ServiceKind(ControllerSettings, _controller, "controller_port"),
    "worker": ServiceKind(WorkerSettings, _worker, "worker_port"),
    "gateway": ServiceKind(GatewaySettings, _gateway, "port"),
    "webui": ServiceKind(WebUISettings, _webui, "webui_port"),
}


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if level != "debug":
        # One line per HTTP call between our own services is noise.
        logging.getLogger("httpx").setLevel(logging.WARNING)


def freeze_startup_heap() -> None:
    """Exempt what start-up made (modules, the engine, the app) from garbage
    collection. It lives as long as the service, and a full collection that
    scans a vLLM worker's heap stalls every request in flight for hundreds of
    milliseconds on a busy core (vLLM's own API server does the same)."""
    gc.collect()
    gc.freeze()


KEEP_ALIVE_S = 65


class ServiceRunner:
    def __init__(self, kind: str, settings: _Settings) -> None:
        self.kind = kind
        self.service = SERVICES[kind]
        self.settings = settings
        self.server: uvicorn.Server | None = None
        self._stop_requested = False

    @property
    def started(self) -> bool:
        """True once the server listens."""
        return self.server is not None and self.server.started

    @property
    def port(self) -> int:
        return getattr(self.settings, self.service.port_field)

    def server_config(self, app: Any) -> uvicorn.Config:
        return uvicorn.Config(
            app,
            host=self.settings.host,
            port=self.port,
            log_level=self.settings.log_level,
            timeout_graceful_shutdown=5,
            # Longer than clients keep an idle pooled connection (httpx, and
            # so the openai client, 5 s): a server that closes an idle
            # connection first races the client's next request on it, which
            # then fails without an answer.
            timeout_keep_alive=KEEP_ALIVE_S,
        )

    async def serve(self) -> None:
        app, cleanup = await self.service.factory(self.settings)
        try:
            self.server = uvicorn.Server(self.server_config(app))
            if self._stop_requested:
                return
            logger.info(
                "%s listening on %s:%d", self.kind, self.settings.host, self.port
            )
            freeze_startup_heap()
            await self.server.serve()
        finally:
            if cleanup is not None:
                cleanup()

    def run(self) -> None:
        """Serve until interrupted (foreground) or stop() (from another thread)."""
        asyncio.run(self.serve())

    def stop(self) -> None:
        self._stop_requested = True
        if self.server is not None:
            self.server.should_exit = True
