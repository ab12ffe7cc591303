"""The web UI service: the Gradio page mounted on FastAPI.

create_app(settings) talks to the controller through one ControllerClient on
one httpx.AsyncClient, opened and closed by the app's lifespan; tests pass a
fake Backend instead.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import gradio as gr
import httpx
from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from qwen_vllm import __version__
from qwen_vllm.serving.client import Backend, ControllerClient
from qwen_vllm.serving.settings import WebUISettings
from qwen_vllm.serving.webui.session import ChatSession
from qwen_vllm.serving.webui.ui import CSS, build_blocks, theme

logger = logging.getLogger(__name__)

USER_NAME = "qwen"


class _SessionSlot:
    """The ChatSession of a running app (set by the lifespan)."""

    def __init__(self, session: ChatSession | None = None) -> None:
        self.session = session

    def __call__(self) -> ChatSession:
        if self.session is None:
            raise RuntimeError("the web UI is not running")
        return self.session


class StripPrefixMiddleware:
    """Serve the app under `prefix` as well as at the root.

    With a root path set, Gradio writes its public URLs under the prefix; an
    ingress that strips the prefix and one that passes it through both work.
    """

    def __init__(self, app: ASGIApp, prefix: str) -> None:
        self.app = app
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            path: str = scope["path"]
            if path == self.prefix or path.startswith(self.prefix + "/"):
                scope = dict(scope)
                scope["path"] = path[len(self.prefix) :] or "/"
                scope["raw_path"] = scope["path"].encode()
        await self.app(scope, receive, send)


def normalized_root_path(root_path: str) -> str:
    """'' or '/prefix' (leading slash, no trailing slash)."""
    stripped = root_path.strip().strip("/")
    return f"/{stripped}" if stripped else ""


def create_app(settings: WebUISettings, backend: Backend | None = None) -> FastAPI:
    slot = _SessionSlot(ChatSession(backend) if backend is not None else None)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if backend is not None:
            yield
            return
        async with httpx.AsyncClient() as http:
            slot.session = ChatSession(ControllerClient.from_settings(http, settings))
            try:
                yield
            finally:
                slot.session = None

    app = FastAPI(
        title="qwen_vllm web UI",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    root_path = normalized_root_path(settings.webui_root_path)
    password = settings.webui_password
    blocks = build_blocks(slot)
    blocks.queue(default_concurrency_limit=None)
    gr.mount_gradio_app(
        app,
        blocks,
        path="/",
        auth=(USER_NAME, password.get_secret_value()) if password else None,
        auth_message=f"Log in as {USER_NAME!r}." if password else None,
        root_path=root_path or None,
        ssr_mode=False,
        footer_links=["gradio"],
        theme=theme(),
        css=CSS,
    )
    if root_path:
        app.add_middleware(StripPrefixMiddleware, prefix=root_path)
    return app
