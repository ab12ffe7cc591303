from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from qwen_vllm.serving.controller import create_app
from qwen_vllm.serving.protocol import (
    QWEN_CONV_TEMPLATE,
    ErrorCode,
    WorkerStatus,
    iter_stream_chunks,
)
from qwen_vllm.serving.security import INTERNAL_TOKEN_HEADER, guard
from qwen_vllm.serving.settings import ControllerSettings

# Long enough that the background loop stays out of unit tests, which probe
# through POST /refresh_all_workers instead.
NO_BACKGROUND_CHECKS = 3600.0


class FakeProbe:
    """Worker statuses by URL; an exception (or an unknown URL) fails the probe."""

    def __init__(self) -> None:
        self.results: dict[str, WorkerStatus | Exception] = {}
        self.calls: list[str] = []

    async def __call__(self, worker_url: str) -> WorkerStatus:
        self.calls.append(worker_url)
        result = self.results.get(worker_url, ConnectionError("connection refused"))
        if isinstance(result, Exception):
            raise result
        return result


def make_settings(**values: Any) -> ControllerSettings:
    values.setdefault("health_check_interval", NO_BACKGROUND_CHECKS)
    return ControllerSettings(**values)


@contextlib.asynccontextmanager
async def controller_client(
    settings: ControllerSettings, probe: FakeProbe, **kwargs: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, FastAPI]]:
    app = create_app(settings, probe=probe, **kwargs)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://controller"
        ) as client,
    ):
        yield client, app


def status(*models: str, speed: int = 1, queue_length: int = 0) -> dict[str, Any]:
    return {"model_names": list(models), "speed": speed, "queue_length": queue_length}


async def register(
    client: httpx.AsyncClient, name: str, worker_status: dict | None, **extra: Any
) -> httpx.Response:
    body = {"worker_name": name, "check_heart_beat": True, "worker_status": None}
    body["worker_status"] = worker_status
    body.update(extra)
    response = await client.post("/register_worker", json=body)
    assert response.status_code == 200, response.text
    return response


async def workers_by_name(client: httpx.AsyncClient) -> dict[str, dict]:
    response = await client.get("/workers")
    assert response.status_code == 200
    return {w["name"]: w for w in response.json()["workers"]}


async def read_chunks(response: httpx.Response) -> list[dict]:
    return [chunk async for chunk in iter_stream_chunks(response.aiter_bytes())]


# --- unit tests: the app through ASGI, a fake probe, no network ---------------


async def test_register_list_models_and_health() -> None:
    async with controller_client(make_settings(), FakeProbe()) as (client, _):
        await register(client, "http://w1:1", status("qwen-b", "qwen-a"))
        await register(client, "http://w2:2/", status("qwen-b"), multimodal=True)

        models = (await client.post("/list_models")).json()
        assert models == {"models": ["qwen-a", "qwen-b"]}
        language = (await client.post("/list_language_models")).json()["models"]
        assert language == ["qwen-a", "qwen-b"]
        multimodal = (await client.post("/list_multimodal_models")).json()["models"]
        assert multimodal == ["qwen-b"]

        health = await client.get("/health")
        assert health.json() == {"status": "ok", "workers": 2, "healthy_workers": 2}
        workers = await workers_by_name(client)
        # The trailing slash is dropped so heartbeats find the same worker.
        assert set(workers) == {"http://w1:1", "http://w2:2"}
        assert workers["http://w1:1"]["healthy"] is True
        assert workers["http://w1:1"]["last_heartbeat_age_s"] < 5

        aggregate = (await client.post("/worker_get_status")).json()
        assert aggregate == {
            "model_names": ["qwen-a", "qwen-b"],
            "speed": 2,
            "queue_length": 0,
        }
        assert (await client.get("/test_connection")).json() == "success"


async def test_register_without_status_asks_the_worker() -> None:
    probe = FakeProbe()
    probe.results["http://w1:1"] = WorkerStatus(**status("qwen", queue_length=3))
    async with controller_client(make_settings(), probe) as (client, _):
        await register(client, "http://w1:1", None)
        assert probe.calls == ["http://w1:1"]
        assert (await client.post("/list_models")).json()["models"] == ["qwen"]
        assert (await workers_by_name(client))["http://w1:1"]["queue_length"] == 3

        failed = await client.post(
            "/register_worker",
            json={"worker_name": "http://dead:1", "check_heart_beat": True},
        )
        assert failed.status_code == 502
        assert "http://dead:1" in failed.json()["error"]["message"]
        assert "http://dead:1" not in await workers_by_name(client)


async def test_unregister_removes_the_worker_at_once() -> None:
    async with controller_client(make_settings(), FakeProbe()) as (client, _):
        await register(client, "http://w1:1", status("qwen"))
        first = await client.post(
            "/unregister_worker", json={"worker_name": "http://w1:1"}
        )
        assert first.json() == {"removed": True}
        again = await client.post(
            "/unregister_worker", json={"worker_name": "http://w1:1"}
        )
        assert again.json() == {"removed": False}
        assert (await client.post("/list_models")).json() == {"models": []}


async def test_shortest_queue_picks_least_loaded() -> None:
    async with controller_client(make_settings(), FakeProbe()) as (client, _):
        await register(client, "http://busy:1", status("qwen", queue_length=5))
        await register(client, "http://idle:1", status("qwen", queue_length=1))
        # 3 queued at speed 4 is the lightest load: 0.75.
        await register(client, "http://fast:1", status("qwen", speed=4, queue_length=3))
        await register(client, "http://other:1", status("other-model"))

        response = await client.post("/get_worker_address", json={"model": "qwen"})
        assert response.json() == {"address": "http://fast:1"}
        # The pick counts as queued: fast is now at 4/4 = 1.0, tied with idle.
        assert (await workers_by_name(client))["http://fast:1"]["queue_length"] == 4
        # Whichever wins the tie, the other is then lighter: one pick each.
        picks = set()
        for _ in range(2):
            response = await client.post("/get_worker_address", json={"model": "qwen"})
            picks.add(response.json()["address"])
        assert picks == {"http://fast:1", "http://idle:1"}


async def test_shortest_queue_spreads_a_burst() -> None:
    async with controller_client(make_settings(), FakeProbe()) as (client, _):
        names = [f"http://w{i}:1" for i in range(3)]
        for name in names:
            await register(client, name, status("qwen"))
        picks = Counter()
        for _ in range(6):
            response = await client.post("/get_worker_address", json={"model": "qwen"})
            picks[response.json()["address"]] += 1
        assert picks == dict.fromkeys(names, 2)


async def test_lottery_spreads_by_speed() -> None:
    settings = make_settings(dispatch_method="lottery")
    async with controller_client(settings, FakeProbe()) as (client, app):
        await register(client, "http://slow:1", status("qwen", speed=1))
        await register(client, "http://fast:1", status("qwen", speed=3))
        response = await client.post("/get_worker_address", json={"model": "qwen"})
        assert response.json()["address"] in {"http://slow:1", "http://fast:1"}

        registry = app.state.controller.registry
        draws = Counter([await registry.choose("qwen") for _ in range(2000)])
        # Expected 0.75; one standard deviation is about 0.01.
        assert 0.70 < draws["http://fast:1"] / 2000 < 0.80
        assert draws["http://slow:1"] > 0
        # Lottery does not count its picks as queued.
        assert (await workers_by_name(client))["http://fast:1"]["queue_length"] == 0


async def test_heartbeats() -> None:
    async with controller_client(make_settings(), FakeProbe()) as (client, _):
        await register(client, "http://w1:1", status("qwen"))
        beat = {"worker_name": "http://w1:1", "queue_length": 4}
        response = await client.post("/receive_heart_beat", json=beat)
        assert response.json() == {"exist": True}
        assert (await workers_by_name(client))["http://w1:1"]["queue_length"] == 4

        unknown = {"worker_name": "http://stranger:1", "queue_length": 0}
        response = await client.post("/receive_heart_beat", json=unknown)
        assert response.json() == {"exist": False}


async def test_unhealthy_worker_excluded_then_restored() -> None:
    probe = FakeProbe()
    probe.results["http://good:1"] = WorkerStatus(**status("qwen"))
    settings = make_settings(unhealthy_after_failures=2)
    async with controller_client(settings, probe) as (client, _):
        await register(client, "http://good:1", status("qwen"))
        await register(client, "http://flaky:1", status("qwen", "flaky-only"))

        await client.post("/refresh_all_workers")
        workers = await workers_by_name(client)
        assert workers["http://flaky:1"]["healthy"] is True
        assert workers["http://flaky:1"]["consecutive_failures"] == 1

        refreshed = await client.post("/refresh_all_workers")
        assert refreshed.json() == {"workers": 2, "healthy_workers": 1}
        assert (await workers_by_name(client))["http://flaky:1"]["healthy"] is False
        # Still listed (known, temporarily unavailable), but never routed to.
        listed = (await client.post("/list_models")).json()["models"]
        assert listed == ["flaky-only", "qwen"]
        for _ in range(10):
            response = await client.post("/get_worker_address", json={"model": "qwen"})
            assert response.json()["address"] == "http://good:1"
        response = await client.post(
            "/get_worker_address", json={"model": "flaky-only"}
        )
        assert response.json()["address"] == ""
        assert "right now" in response.json()["error"]
        # Heartbeats keep it known but do not make it routable.
        beat = {"worker_name": "http://flaky:1", "queue_length": 0}
        assert (await client.post("/receive_heart_beat", json=beat)).json()["exist"]
        address = await client.post("/get_worker_address", json={"model": "flaky-only"})
        assert address.json()["address"] == ""

        probe.results["http://flaky:1"] = WorkerStatus(
            **status("qwen", "flaky-only", queue_length=7)
        )
        await client.post("/refresh_all_workers")
        flaky = (await workers_by_name(client))["http://flaky:1"]
        assert flaky["healthy"] is True
        assert flaky["queue_length"] == 7
        assert flaky["consecutive_failures"] == 0
        models = (await client.post("/list_models")).json()["models"]
        assert models == ["flaky-only", "qwen"]


async def test_failing_worker_removed_after_expiry() -> None:
    settings = make_settings(unhealthy_after_failures=1)
    async with controller_client(settings, FakeProbe(), worker_expiry_s=0.3) as (
        client,
        _,
    ):
        await register(client, "http://dead:1", status("qwen"))
        await register(
            client, "http://manual:1", status("qwen"), check_heart_beat=False
        )
        await client.post("/refresh_all_workers")
        workers = await workers_by_name(client)
        assert workers["http://dead:1"]["healthy"] is False

        await asyncio.sleep(0.35)
        await client.post("/refresh_all_workers")
        workers = await workers_by_name(client)
        assert "http://dead:1" not in workers
        # A worker without heartbeats could not learn it was dropped: kept, unused.
        assert workers["http://manual:1"]["healthy"] is False
        beat = {"worker_name": "http://dead:1", "queue_length": 0}
        response = await client.post("/receive_heart_beat", json=beat)
        assert response.json() == {"exist": False}


async def test_background_checks_run_in_the_lifespan() -> None:
    settings = make_settings(health_check_interval=0.05, unhealthy_after_failures=2)
    async with controller_client(settings, FakeProbe()) as (client, _):
        await register(client, "http://dead:1", status("qwen"))
        deadline = time.monotonic() + 5
        while (await workers_by_name(client))["http://dead:1"]["healthy"]:
            assert time.monotonic() < deadline, "background probes never ran"
            await asyncio.sleep(0.02)
        address = await client.post("/get_worker_address", json={"model": "qwen"})
        assert address.json()["address"] == ""


async def test_no_worker() -> None:
    async with controller_client(make_settings(), FakeProbe()) as (client, _):
        await register(client, "http://w1:1", status("qwen-7b"))
        response = await client.post("/get_worker_address", json={"model": "llama"})
        body = response.json()
        assert body["address"] == ""
        assert "'llama'" in body["error"]
        assert "qwen-7b" in body["error"]

        params = {"model": "llama", "prompt": "hi"}
        async with client.stream("POST", "/worker_generate_stream", json=params) as r:
            assert r.status_code == 200
            chunks = await read_chunks(r)
        assert len(chunks) == 1
        assert chunks[0]["error_code"] == ErrorCode.CONTROLLER_NO_WORKER
        assert "llama" in chunks[0]["text"]


async def test_internal_token(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    settings = make_settings(internal_token="s3cret-token")
    async with controller_client(settings, FakeProbe()) as (client, _):
        assert (await client.get("/health")).status_code == 200

        for headers in ({}, {INTERNAL_TOKEN_HEADER: "wrong"}):
            response = await client.post("/list_models", headers=headers)
            assert response.status_code == 401
            error = response.json()["error"]
            assert error["type"] == "authentication_error"
            assert error["code"] == 401
            assert INTERNAL_TOKEN_HEADER in error["message"]
        denied = await client.post(
            "/register_worker", json={"worker_name": "http://w1:1"}
        )
        assert denied.status_code == 401
        assert (await client.get("/workers")).status_code == 401

        ok = {INTERNAL_TOKEN_HEADER: "s3cret-token"}
        client.headers.update(ok)
        await register(client, "http://w1:1", status("qwen"))
        response = await client.post("/list_models")
        assert response.status_code == 200
        assert response.json() == {"models": ["qwen"]}
    assert "s3cret-token" not in caplog.text


@pytest.mark.parametrize(
    ("path", "content", "status_code", "mentions"),
    [
        ("/register_worker", b"{not json", 400, "JSON"),
        ("/register_worker", b'{"check_heart_beat": true}', 422, "worker_name"),
        ("/register_worker", b'{"worker_name": "w1"}', 422, "worker_name"),
        ("/register_worker", b"[1, 2]", 422, "body"),
        (
            "/register_worker",
            b'{"worker_name": "http://w:1", "worker_status": {"speed": 1}}',
            422,
            "model_names",
        ),
        (
            "/receive_heart_beat",
            b'{"worker_name": "http://w:1", "queue_length": "many"}',
            422,
            "queue_length",
        ),
        ("/get_worker_address", b"{}", 422, "model"),
        ("/get_worker_address", b'{"model": 7}', 422, "model"),
        ("/worker_generate_stream", b"", 422, "body"),
        ("/unregister_worker", b"null", 422, "body"),
    ],
)
async def test_bad_input_is_a_client_error(
    path: str, content: bytes, status_code: int, mentions: str
) -> None:
    async with controller_client(make_settings(), FakeProbe()) as (client, _):
        response = await client.post(
            path, content=content, headers={"content-type": "application/json"}
        )
    assert response.status_code == status_code, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert mentions in error["message"]
    assert "Traceback" not in response.text


# --- real network: uvicorn servers on loopback --------------------------------


class ServerThread:
    """A uvicorn server on a free 127.0.0.1 port, in a thread of its own."""

    def __init__(self, app: Any) -> None:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True
        )

    def start(self) -> None:
        self._thread.start()
        deadline = time.monotonic() + 15
        while not self._server.started:
            assert self._thread.is_alive(), f"server {self.url} died at start"
            assert time.monotonic() < deadline, f"server {self.url} did not start"
            time.sleep(0.01)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=15)
        self._socket.close()
        assert not self._thread.is_alive(), f"server {self.url} did not stop"


@contextlib.contextmanager
def serving(app: Any) -> Iterator[ServerThread]:
    server = ServerThread(app)
    server.start()
    try:
        yield server
    finally:
        if server._thread.is_alive():
            server.stop()


def fake_worker_app(name: str, model: str, token: str | None) -> FastAPI:
    """Answers like a FastChat worker; requires (and proves) the internal token
    as the real worker does."""
    app = FastAPI()
    guard(app, token)

    @app.post("/worker_get_status")
    async def worker_get_status() -> dict[str, Any]:
        # Always one queued, so an idle newcomer is preferred by shortest_queue.
        return status(model, queue_length=1)

    @app.post("/worker_generate_stream")
    async def worker_generate_stream(request: Request) -> StreamingResponse:
        params = await request.json()

        async def chunks() -> AsyncIterator[bytes]:
            text = ""
            for word in (name, "says", params["prompt"]):
                text = f"{text} {word}".strip()
                yield json.dumps({"text": text, "error_code": 0}).encode() + b"\0"

        return StreamingResponse(chunks())

    return app


def closed_port_url() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


async def stream_text(client: httpx.AsyncClient, prompt: str) -> str:
    params = {"model": "qwen", "prompt": prompt, "max_new_tokens": 8}
    async with client.stream("POST", "/worker_generate_stream", json=params) as r:
        assert r.status_code == 200
        chunks = await read_chunks(r)
    assert chunks, "empty stream"
    assert all(chunk["error_code"] == 0 for chunk in chunks), chunks
    return chunks[-1]["text"]


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_dead_worker_leaves_routing_within_seconds() -> None:
    token = "live-token"
    # The defaults: a probe every second, unhealthy after two failures.
    settings = ControllerSettings(internal_token=token)
    headers = {INTERNAL_TOKEN_HEADER: token}
    with (
        serving(fake_worker_app("alpha", "qwen", token)) as alpha,
        serving(fake_worker_app("beta", "qwen", token)) as beta,
        serving(create_app(settings)) as controller,
    ):
        async with httpx.AsyncClient(
            base_url=controller.url, headers=headers, timeout=10, trust_env=False
        ) as client:
            # Without a status the controller asks the worker (with the token).
            await register(client, alpha.url, None)
            await register(client, beta.url, status("qwen", queue_length=1))
            assert (await client.post("/list_models")).json() == {"models": ["qwen"]}

            speakers = Counter()
            for i in range(6):
                text = await stream_text(client, f"hi{i}")
                assert text.endswith(f"says hi{i}")
                speakers[text.split()[0]] += 1
            assert set(speakers) == {"alpha", "beta"}, speakers

            alpha.stop()
            stopped = time.monotonic()
            while (await workers_by_name(client))[alpha.url]["healthy"]:
                assert time.monotonic() - stopped < 5, "dead worker still routable"
                await asyncio.sleep(0.05)
            removal_s = time.monotonic() - stopped
            print(f"dead worker left routing after {removal_s:.2f} s")
            assert removal_s < 5
            for _ in range(20):
                response = await client.post(
                    "/get_worker_address", json={"model": "qwen"}
                )
                assert response.json()["address"] == beta.url
            for i in range(3):
                assert await stream_text(client, f"again{i}") == f"beta says again{i}"

            # An address registered with a claimed status but never proving
            # the token (nothing listens there) gets no traffic.
            ghost = closed_port_url()
            await register(client, ghost, status("qwen", queue_length=0))
            assert (await workers_by_name(client))[ghost]["healthy"] is False
            response = await client.post("/get_worker_address", json={"model": "qwen"})
            assert response.json()["address"] == beta.url
            assert await stream_text(client, "ghost") == "beta says ghost"


async def test_a_worker_refusing_connections_is_skipped_at_once() -> None:
    # Without a token (FastChat's workers) a claimed status is trusted at once.
    settings = ControllerSettings()
    with (
        serving(fake_worker_app("beta", "qwen", None)) as beta,
        serving(create_app(settings)) as controller,
    ):
        async with httpx.AsyncClient(
            base_url=controller.url, timeout=10, trust_env=False
        ) as client:
            await register(client, beta.url, status("qwen", queue_length=1))
            ghost = closed_port_url()
            await register(client, ghost, status("qwen", queue_length=0))
            response = await client.post("/get_worker_address", json={"model": "qwen"})
            assert response.json()["address"] == ghost
            # Picking it counted a queued request; start it from empty again.
            await client.post("/unregister_worker", json={"worker_name": ghost})
            await register(client, ghost, status("qwen", queue_length=0))
            assert await stream_text(client, "retry") == "beta says retry"
            ghost_info = (await workers_by_name(client))[ghost]
            assert ghost_info["consecutive_failures"] >= 1


@pytest.fixture
def fastchat_worker_module(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> Iterator[Any]:
    """FastChat's worker module, kept from redirecting our output or logging here."""
    monkeypatch.chdir(tmp_path)
    stdout, stderr = sys.stdout, sys.stderr
    try:
        import fastchat.serve.base_model_worker as base_model_worker
        import fastchat.utils as fastchat_utils
    finally:
        sys.stdout, sys.stderr = stdout, stderr
    monkeypatch.setattr(base_model_worker, "worker", None)
    monkeypatch.setattr(base_model_worker, "logger", None)
    try:
        yield base_model_worker
    finally:
        sys.stdout, sys.stderr = stdout, stderr
        handler = fastchat_utils.handler
        if handler is not None:
            for name in ("stdout", "stderr", "model_worker", "controller"):
                logging.getLogger(name).removeHandler(handler)
            handler.close()


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_fastchat_worker_registers_with_our_controller(
    fastchat_worker_module: Any, tmp_path: Any
) -> None:
    from fastchat.conversation import Conversation, get_conv_template

    class StubWorker(fastchat_worker_module.BaseModelWorker):
        """FastChat's worker with its model replaced by a canned answer."""

        def make_conv_template(
            self, conv_template: str | None = None, model_path: str | None = None
        ) -> Conversation:
            return get_conv_template(QWEN_CONV_TEMPLATE)

        def generate_stream_gate(self, params: dict) -> Iterator[bytes]:
            for text in ("stub", "stub answer"):
                yield json.dumps({"text": text, "error_code": 0}).encode() + b"\0"

    settings = ControllerSettings(health_check_interval=0.5)
    with (
        serving(create_app(settings)) as controller,
        serving(fastchat_worker_module.app) as worker_server,
    ):
        stdout, stderr = sys.stdout, sys.stderr
        try:
            worker = StubWorker(
                controller_addr=controller.url,
                worker_addr=worker_server.url,
                worker_id="stub",
                model_path="Qwen/Qwen-7B-Chat",
                model_names=None,
                limit_worker_concurrency=4,
            )
        finally:
            sys.stdout, sys.stderr = stdout, stderr

        async def in_thread(function: Any) -> Any:
            return await asyncio.wait_for(asyncio.to_thread(function), timeout=15)

        await in_thread(worker.register_to_controller)
        async with httpx.AsyncClient(
            base_url=controller.url, timeout=10, trust_env=False
        ) as client:
            assert (await client.post("/list_models")).json() == {
                "models": ["Qwen-7B-Chat"]
            }
            response = await client.post(
                "/get_worker_address", json={"model": "Qwen-7B-Chat"}
            )
            assert response.json() == {"address": worker_server.url}

            await in_thread(worker.send_heart_beat)
            assert (await workers_by_name(client))[worker_server.url]["healthy"]

            # Forgotten by the controller, the worker re-registers on its heartbeat.
            await client.post(
                "/unregister_worker", json={"worker_name": worker_server.url}
            )
            assert (await client.post("/list_models")).json() == {"models": []}
            await in_thread(worker.send_heart_beat)
            assert (await client.post("/list_models")).json() == {
                "models": ["Qwen-7B-Chat"]
            }

            # Our probes understand FastChat's /worker_get_status.
            refreshed = (await client.post("/refresh_all_workers")).json()
            assert refreshed == {"workers": 1, "healthy_workers": 1}

            params = {"model": "Qwen-7B-Chat", "prompt": "hello"}
            async with client.stream(
                "POST", "/worker_generate_stream", json=params
            ) as r:
                chunks = await read_chunks(r)
            assert [c["text"] for c in chunks] == ["stub", "stub answer"]
    repo = Path(__file__).resolve().parents[2]
    assert not (repo / "model_worker_stub.log").exists()
