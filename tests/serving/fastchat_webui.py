"""FastChat's own Gradio web server, in its own virtualenv, for compatibility tests.

FastChat 0.2.36's gradio_web_server does not start on Gradio 6 (the project's
Gradio) and Gradio 5's Starlette pin conflicts with vLLM's, so it runs from a
cached side virtualenv (tests/side_venv.py). It imports
fastchat.model.model_adapter, hence torch, transformers and accelerate: torch
is the CPU build (pinned by its local version, so pip never picks a CUDA one).

Also here: a fake FastChat controller and worker (tiny FastAPI apps on
loopback ports) to point it at; any real controller URL works instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import StreamingResponse

from tests.conftest import free_port
from tests.servers import running
from tests.serving.webui_fakes import ThreadedServer
from tests.side_venv import side_venv_python

# Everything the FastChat web server imports, at versions that work together
# (checked by hand and by tests/serving/test_webui_fastchat.py).
FASTCHAT_WEBUI_REQUIREMENTS = (
    "fschat==0.2.36",
    "gradio==5.50.0",
    "torch==2.13.0+cpu",
    "transformers==4.57.6",
    "accelerate==1.15.0",
)
# Change when the requirements change: a new key builds a new virtualenv.
FASTCHAT_WEBUI_KEY = "fschat-0.2.36_gradio-5.50.0_torch-2.13.0cpu_tf-4.57.6_v1"


def fastchat_webui_python() -> Path:
    """The cached virtualenv's python, built on first use (several minutes)."""
    return side_venv_python(
        "fastchat-webui-venv",
        FASTCHAT_WEBUI_KEY,
        FASTCHAT_WEBUI_REQUIREMENTS,
        check_import="fastchat.serve.gradio_web_server",
    )


@contextlib.contextmanager
def fastchat_webui(
    controller_url: str,
    *,
    workdir: Path,
    port: int | None = None,
    python: Path | None = None,
    timeout: float = 240.0,
) -> Iterator[str]:
    """Run `python -m fastchat.serve.gradio_web_server`; yields its URL.

    FastChat writes log files into its working directory: `workdir`.
    """
    python = python or fastchat_webui_python()
    port = port or free_port()
    url = f"http://127.0.0.1:{port}/"
    env = {
        "GRADIO_ANALYTICS_ENABLED": "False",
        "HF_HUB_OFFLINE": "1",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    cmd = [
        str(python),
        "-m",
        "fastchat.serve.gradio_web_server",
        "--controller-url",
        controller_url.rstrip("/"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    log = workdir / "gradio_web_server.out"
    with running(cmd, url, log=log, env=env, cwd=workdir, timeout=timeout):
        yield url


# A fake FastChat control plane


class FakeFastChatWorker:
    """Speaks FastChat's controller and worker protocols for one model.

    The controller routes every request to the worker, served by the same
    process on another port.
    """

    def __init__(self, model: str, answer: str, delay: float = 0.05) -> None:
        from fastchat.conversation import get_conv_template

        self.model = model
        self.answer = answer
        self.delay = delay
        self.requests: list[dict[str, Any]] = []
        self.conv = jsonable_encoder(get_conv_template("qwen-7b-chat"))
        self.worker = ThreadedServer(self._worker_app())
        self.controller = ThreadedServer(self._controller_app())

    def __enter__(self) -> FakeFastChatWorker:
        self.worker.__enter__()
        self.controller.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.controller.__exit__()
        self.worker.__exit__()

    @property
    def controller_url(self) -> str:
        return self.controller.url("")

    def _status(self) -> dict[str, Any]:
        return {"model_names": [self.model], "speed": 1, "queue_length": 0}

    def _controller_app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/refresh_all_workers")
        async def refresh_all_workers() -> None:
            return None

        @app.post("/list_models")
        @app.post("/list_language_models")
        async def list_models() -> dict[str, Any]:
            return {"models": [self.model]}

        @app.post("/list_multimodal_models")
        async def list_multimodal_models() -> dict[str, Any]:
            return {"models": []}

        @app.post("/get_worker_address")
        async def get_worker_address(request: Request) -> dict[str, str]:
            body = await request.json()
            known = body.get("model") == self.model
            return {"address": self.worker.url("") if known else ""}

        @app.post("/worker_get_status")
        async def worker_get_status() -> dict[str, Any]:
            return self._status()

        @app.post("/receive_heart_beat")
        async def receive_heart_beat() -> dict[str, bool]:
            return {"exist": True}

        @app.get("/test_connection")
        async def test_connection() -> str:
            return "success"

        return app

    def _worker_app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/worker_generate_stream")
        async def worker_generate_stream(request: Request) -> StreamingResponse:
            self.requests.append(await request.json())
            return StreamingResponse(self._stream())

        @app.post("/worker_get_conv_template")
        async def worker_get_conv_template() -> dict[str, Any]:
            return {"conv": self.conv}

        @app.post("/count_token")
        async def count_token(request: Request) -> dict[str, int]:
            body = await request.json()
            return {"count": len(str(body.get("prompt", ""))), "error_code": 0}

        @app.post("/model_details")
        async def model_details() -> dict[str, int]:
            return {"context_length": 8192}

        @app.post("/worker_get_status")
        async def worker_get_status() -> dict[str, Any]:
            return self._status()

        return app

    async def _stream(self) -> AsyncIterator[bytes]:
        for end in range(3, len(self.answer) + 3, 3):
            await asyncio.sleep(self.delay)
            chunk = {"text": self.answer[:end], "error_code": 0}
            yield json.dumps(chunk).encode() + b"\0"


def controller_url_from_env() -> str | None:
    """A real controller to test against instead of the fake one."""
    return os.environ.get("QWEN_VLLM_TEST_CONTROLLER_URL") or None
