"""ControllerClient against tiny real HTTP servers on 127.0.0.1, and the whole
gateway in front of them (its own lifespan-made client, real sockets)."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from qwen_vllm.serving.client import (
    ControllerClient,
    ControllerUnavailableError,
    NoWorkerError,
    UnknownModelError,
    WorkerError,
    WorkerTimeoutError,
)
from qwen_vllm.serving.gateway import create_app
from qwen_vllm.serving.protocol import (
    ErrorCode,
    GenerateChunk,
    GenerateParams,
)
from qwen_vllm.serving.security import INTERNAL_TOKEN_HEADER
from tests.serving.test_gateway import make_settings

MODEL = "qwen-demo"
TOKEN = "internal-secret"


@asynccontextmanager
async def one_worker(
    **client_options: Any,
) -> AsyncIterator[tuple[ControllerClient, FastAPI]]:
    """A client of a controller with one worker ("w1"); yields the controller
    app too."""
    async with serve(worker_app("w1")) as worker_url:
        controller = controller_app([worker_url])
        async with serve(controller) as url, httpx.AsyncClient() as http:
            options = {"internal_token": TOKEN, **client_options}
            yield ControllerClient(http, url, **options), controller


@asynccontextmanager
async def serve(app: FastAPI) -> AsyncIterator[str]:
    """Run an app with uvicorn on a free 127.0.0.1 port; yields its URL."""
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        log_level="critical",
        lifespan="on",
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    for _ in range(500):
        if server.started or task.done():
            break
        await asyncio.sleep(0.01)
    assert server.started, "server did not start"
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


def dead_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there any more


def controller_app(addresses: list[str], models: tuple[str, ...] = (MODEL,)) -> FastAPI:
    """Hands out `addresses` in turn, ignoring `exclude` as FastChat does."""
    app = FastAPI()
    app.state.lookups = []
    turn = iter(range(1_000_000))

    @app.post("/list_models")
    async def list_models() -> dict[str, Any]:
        return {"models": list(models)}

    @app.post("/get_worker_address")
    async def get_worker_address(request: Request) -> dict[str, Any]:
        body = await request.json()
        app.state.lookups.append(body)
        if body["model"] not in models or not addresses:
            return {"address": "", "error": "No healthy worker for that model."}
        return {"address": addresses[next(turn) % len(addresses)]}

    @app.get("/workers")
    async def workers() -> dict[str, Any]:
        return {
            "workers": [
                {"name": a, "models": list(models), "queue_length": i, "healthy": True}
                for i, a in enumerate(addresses)
            ]
        }

    return app


def worker_app(name: str) -> FastAPI:
    """A FastChat worker whose behaviour the prompt picks: "die", "stall",
    "silent", "long" or anything else (a short answer)."""
    app = FastAPI()
    app.state.details_calls = 0
    app.state.closed = asyncio.Event()

    def check(request: Request) -> JSONResponse | None:
        if request.headers.get(INTERNAL_TOKEN_HEADER) != TOKEN:
            return JSONResponse({"detail": "bad token"}, 401)
        return None

    def chunk(text: str, final: bool = False) -> bytes:
        return GenerateChunk(
            text=text, finish_reason="stop" if final else None
        ).encode()

    @app.post("/worker_generate_stream")
    async def generate_stream(request: Request) -> Any:
        if (refused := check(request)) is not None:
            return refused
        params = GenerateParams.model_validate(await request.json())
        prompt = params.prompt or ""

        async def body() -> AsyncIterator[bytes]:
            try:
                if prompt == "silent":
                    await asyncio.sleep(30)
                yield chunk(f"{name}:")
                yield chunk(f"{name}: hello")
                if prompt == "die":
                    raise RuntimeError("the worker process died")
                if prompt == "stall":
                    await asyncio.sleep(30)
                if prompt == "long":
                    for i in range(500):
                        await asyncio.sleep(0.01)
                        yield chunk(f"{name}: hello" + " x" * i)
                yield chunk(f"{name}: hello world", final=True)
            finally:
                app.state.closed.set()

        return StreamingResponse(body())

    @app.post("/worker_generate")
    async def generate(request: Request) -> Any:
        if (refused := check(request)) is not None:
            return refused
        return JSONResponse(
            GenerateChunk(text=f"{name}: whole", finish_reason="stop").model_dump()
        )

    @app.post("/model_details")
    async def model_details(request: Request) -> Any:
        if (refused := check(request)) is not None:
            return refused
        app.state.details_calls += 1
        return {"context_length": 4096}

    return app


def make_client(http: httpx.AsyncClient, url: str, **kwargs: Any) -> ControllerClient:
    return ControllerClient(http, url, internal_token=TOKEN, **kwargs)


async def collect(client: ControllerClient, prompt: str) -> list[GenerateChunk]:
    params = GenerateParams(prompt=prompt, max_new_tokens=8)
    return [chunk async for chunk in client.generate_stream(MODEL, params)]


async def test_retries_on_another_worker_when_the_first_is_down() -> None:
    dead = dead_address()
    worker = worker_app("w2")
    async with serve(worker) as good:
        controller = controller_app([dead, good])
        async with serve(controller) as url, httpx.AsyncClient() as http:
            client = make_client(http, url)
            assert await client.list_models() == [MODEL]
            chunks = await collect(client, "hi")
            assert chunks[-1].text == "w2: hello world"
            assert chunks[-1].finish_reason == "stop"
            lookups = controller.state.lookups
            assert lookups[0] == {"model": MODEL}
            assert lookups[1] == {"model": MODEL, "exclude": [dead]}

            # Non-streaming calls retry the same way.
            whole = await client.generate(MODEL, GenerateParams(prompt="hi"))
            assert whole.text == "w2: whole"
            assert (await client.model_details(MODEL)).context_length == 4096
            assert (await client.model_details(MODEL)).context_length == 4096
            assert worker.state.details_calls == 1  # cached

            workers = await client.workers()
            assert [(w.address, w.queue_length) for w in workers] == [
                (dead, 0),
                (good, 1),
            ]


async def test_a_worker_dying_mid_stream_ends_with_an_error_chunk() -> None:
    async with one_worker() as (client, _):
        started = time.monotonic()
        chunks = await asyncio.wait_for(collect(client, "die"), 10)
        assert time.monotonic() - started < 5
    assert [c.text for c in chunks[:2]] == ["w1:", "w1: hello"]
    assert chunks[-1].error_code == ErrorCode.INTERNAL_ERROR
    assert chunks[-1].finish_reason == "error"
    assert len(chunks) == 3


async def test_a_stalled_worker_times_out_with_an_error_chunk() -> None:
    async with one_worker(request_timeout=0.5) as (client, _):
        started = time.monotonic()
        chunks = await asyncio.wait_for(collect(client, "stall"), 10)
        assert time.monotonic() - started < 5
    assert chunks[-1].error_code == ErrorCode.CONTROLLER_WORKER_TIMEOUT
    assert [c.text for c in chunks[:-1]] == ["w1:", "w1: hello"]


async def test_a_silent_worker_is_a_timeout_not_retried() -> None:
    async with one_worker(request_timeout=0.5) as (client, controller):
        with pytest.raises(WorkerTimeoutError):
            await asyncio.wait_for(collect(client, "silent"), 10)
        assert len(controller.state.lookups) == 1


async def test_no_worker_unknown_model_and_all_workers_down() -> None:
    async with httpx.AsyncClient() as http:
        async with serve(controller_app([])) as url:
            client = make_client(http, url)
            with pytest.raises(NoWorkerError, match="No healthy worker"):
                await client.worker_address(MODEL)
            with pytest.raises(UnknownModelError):
                await client.worker_address("gpt-9")
        dead = [dead_address(), dead_address()]
        async with serve(controller_app(dead)) as url:
            client = make_client(http, url, max_attempts=3)
            started = time.monotonic()
            with pytest.raises(WorkerError, match="3 tried"):
                await collect(client, "hi")
            with pytest.raises(WorkerError):
                await client.generate(MODEL, GenerateParams(prompt="hi"))
            assert time.monotonic() - started < 5
        client = make_client(http, dead_address())
        with pytest.raises(ControllerUnavailableError):
            await client.list_models()


async def test_a_controller_connection_closed_as_idle_is_asked_again() -> None:
    """The keep-alive race: the controller closes a pooled connection just as
    the next lookup goes out on it. Here, deterministically: the second request
    on the first connection is read and the connection closed unanswered."""
    connections = 0
    reply = json.dumps({"models": [MODEL]}).encode()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        nonlocal connections
        connections += 1
        first_connection = connections == 1
        try:
            for served in itertools.count():
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?i)content-length: *(\d+)", head)
                await reader.readexactly(int(length.group(1)) if length else 0)
                if first_connection and served == 1:
                    return  # closed without an answer
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(reply), reply)
                )
                await writer.drain()
        except asyncio.IncompleteReadError:
            return
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with httpx.AsyncClient() as http:
            client = make_client(http, f"http://127.0.0.1:{port}")
            assert await client.list_models() == [MODEL]
            assert await client.list_models() == [MODEL]
        assert connections == 2
    finally:
        server.close()
        await server.wait_closed()


async def test_a_wrong_internal_token_is_a_worker_failure() -> None:
    async with one_worker(internal_token="wrong", max_attempts=2) as (client, _):
        with pytest.raises(WorkerError):
            await collect(client, "hi")


async def test_gateway_end_to_end_over_real_sockets() -> None:
    """The gateway's lifespan makes its own ControllerClient; a client leaving
    mid-stream makes the gateway close the worker's stream."""
    worker = worker_app("w1")
    async with serve(worker) as worker_url, serve(controller_app([worker_url])) as url:
        settings = make_settings(
            controller_address=url, internal_token=TOKEN, api_keys=["sk-e2e"]
        )
        async with serve(create_app(settings)) as gateway:
            client = openai.AsyncOpenAI(
                base_url=gateway + "/v1", api_key="sk-e2e", max_retries=0
            )
            assert [m.id for m in (await client.models.list()).data] == [MODEL]
            completion = await client.completions.create(model=MODEL, prompt="hi")
            assert completion.choices[0].text == "w1: whole"
            async with httpx.AsyncClient(timeout=10) as http:
                metrics = await http.get(
                    gateway + "/metrics", headers={"Authorization": "Bearer sk-e2e"}
                )
                assert f'worker_queue_length{{worker="{worker_url}"}} 0.0' in (
                    metrics.text
                )
                body = {"model": MODEL, "prompt": "long", "stream": True}
                headers = {"Authorization": "Bearer sk-e2e"}
                async with http.stream(
                    "POST", gateway + "/v1/completions", json=body, headers=headers
                ) as response:
                    assert response.status_code == 200
                    events = 0
                    async for line in response.aiter_lines():
                        if line.startswith("data: "):
                            assert "error" not in json.loads(line[6:])
                            events += 1
                        if events == 3:
                            break
            # The whole answer would take over 5 s.
            await asyncio.wait_for(worker.state.closed.wait(), 3)
            await client.close()


def test_gateway_imports_no_engine() -> None:
    code = (
        "import sys\n"
        "import qwen_vllm.serving.gateway, qwen_vllm.serving.client\n"
        "import qwen_vllm.chat.react\n"
        "heavy = [m for m in ('vllm', 'torch', 'transformers') if m in sys.modules]\n"
        "print(heavy)\n"
        "sys.exit(1 if heavy else 0)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "[]"
