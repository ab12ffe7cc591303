"""A scripted Backend for the web UI tests (unit and browser), and a
background-thread uvicorn to serve apps on loopback.

ScriptedBackend is thread-safe enough for a browser test that serves the app
in another thread: the test thread only reads the records and swaps scripts
between requests.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import uvicorn

from qwen_vllm.serving.client import BackendError, ModelDetails, UnknownModelError
from qwen_vllm.serving.protocol import (
    ChatDefaults,
    ErrorCode,
    GenerateChunk,
    GenerateParams,
)
from tests.conftest import free_port

MODEL = "qwen-v1-demo"
OTHER_MODEL = "qwen-v1-other"

# Markdown with a code block and Chinese text, as a Qwen chat model answers.
MARKDOWN_ANSWER = (
    "## 快速排序 Quicksort\n\n"
    "快速排序是一种**分治**算法。Here is a short version:\n\n"
    "```python\n"
    "def quicksort(items):\n"
    "    if len(items) <= 1:\n"
    "        return items\n"
    "    pivot, *rest = items\n"
    "    return (quicksort([x for x in rest if x < pivot]) + [pivot]\n"
    "            + quicksort([x for x in rest if x >= pivot]))\n"
    "```\n\n"
    "- 平均复杂度 average: `O(n log n)`\n"
    "- 最坏情况 worst case: `O(n^2)`\n\n"
    "希望这对你有帮助！"
)
ANSWER_END = "希望这对你有帮助！"


@dataclass
class Script:
    """What the fake worker streams for one request."""

    text: str = "Hello! 你好！"
    piece: int = 4  # characters per chunk
    delay: float = 0.0  # seconds before each chunk
    finish_reason: str = "stop"
    # Stream an error chunk after this many chunks (the worker died).
    fail_after: int | None = None
    error_code: int = ErrorCode.INTERNAL_ERROR
    error_text: str = "The worker's stream broke off."
    # Raised when the stream starts, before any chunk (no worker, ...).
    raises: BackendError | None = None


class ScriptedBackend:
    """Stand-in for ControllerClient; records requests and aborted streams."""

    def __init__(
        self, models: tuple[str, ...] = (MODEL,), context: int | None = 2048
    ) -> None:
        self.models = list(models)
        self.context = context
        self.chat_defaults: ChatDefaults | None = None
        self.scripts: list[Script] = []  # used in order, then `default`
        self.default = Script()
        self.list_error: BackendError | None = None
        self.calls: list[tuple[str, GenerateParams]] = []
        self.finished = 0  # streams that ran to their end
        self.aborted = 0  # streams closed before their end
        self.stream_started = threading.Event()
        self.stream_closed = threading.Event()

    def next_script(self, script: Script) -> None:
        self.scripts.append(script)

    async def list_models(self) -> list[str]:
        if self.list_error is not None:
            raise self.list_error
        return list(self.models)

    async def model_details(self, model: str) -> ModelDetails:
        if model not in self.models:
            raise UnknownModelError(model)
        return ModelDetails(
            context_length=self.context, chat_defaults=self.chat_defaults
        )

    async def generate(self, model: str, params: GenerateParams) -> GenerateChunk:
        last = GenerateChunk()
        async for chunk in self.generate_stream(model, params):
            last = chunk
        return last

    async def generate_stream(
        self, model: str, params: GenerateParams
    ) -> AsyncIterator[GenerateChunk]:
        script = self.scripts.pop(0) if self.scripts else self.default
        if script.raises is not None:
            raise script.raises
        if model not in self.models:
            raise UnknownModelError(model)
        self.calls.append((model, params))
        self.stream_closed.clear()
        self.stream_started.set()
        done = False
        try:
            pieces = range(script.piece, len(script.text) + script.piece, script.piece)
            for index, end in enumerate(pieces):
                if script.fail_after is not None and index >= script.fail_after:
                    yield GenerateChunk(
                        text=script.error_text,
                        error_code=script.error_code,
                        finish_reason="error",
                    )
                    done = True
                    return
                if script.delay:
                    await asyncio.sleep(script.delay)
                final = end >= len(script.text)
                yield GenerateChunk(
                    text=script.text[:end],
                    finish_reason=script.finish_reason if final else None,
                )
            done = True
        finally:
            if done:
                self.finished += 1
            else:
                self.aborted += 1
            self.stream_started.clear()
            self.stream_closed.set()


class ThreadedServer:
    """uvicorn serving an ASGI app on a free loopback port in a thread."""

    def __init__(self, app: Any, port: int | None = None) -> None:
        self.port = port or free_port()
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def __enter__(self) -> ThreadedServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"the server on port {self.port} did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)
