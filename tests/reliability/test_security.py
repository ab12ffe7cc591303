"""Access control and secrecy of every service.

Routes are enumerated from the apps themselves, so an endpoint added later is
covered without touching this file: the gateway wants an API key everywhere
but GET /health, the controller and the worker want the internal token
everywhere but GET /health. Per-key rate limits hold under a concurrent burst
without touching other keys, and no secret reaches a log line or an error
body.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from qwen_vllm.serving import controller as controller_module
from qwen_vllm.serving.gateway import create_app as create_gateway
from qwen_vllm.serving.security import INTERNAL_TOKEN_HEADER
from qwen_vllm.serving.settings import (
    ControllerSettings,
    GatewaySettings,
    WorkerSettings,
    build_settings,
)
from qwen_vllm.serving.worker import app as worker_module
from tests.serving.test_controller import serving
from tests.serving.test_gateway import MODEL, FakeBackend, ManualClock
from tests.serving.test_worker import FakeEngine

KEYS = ["sk-sec-alpha-7f3a9c", "sk-sec-bravo-2b8e1d"]
TOKEN = "itok-sec-charlie-5c4f0e"
SECRETS = [*KEYS, TOKEN]
OPEN = {("GET", "/health"), ("HEAD", "/health")}
_PARAM = re.compile(r"{[^}]+}")


def routes(app: FastAPI) -> list[tuple[str, str]]:
    """(method, path) of every route the app serves, path parameters filled."""
    found = []
    for route in app.routes:
        path = _PARAM.sub("x", getattr(route, "path", ""))
        for method in sorted(getattr(route, "methods", None) or {"GET"}):
            found.append((method, path))
    return found


def body_for(method: str) -> dict[str, Any]:
    if method in ("POST", "PUT", "PATCH"):
        return {
            "json": {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
        }
    return {}


def assert_no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"secret {secret[:8]}... leaked"


@asynccontextmanager
async def asgi_client(app: FastAPI, lifespan: bool = True) -> AsyncIterator[Any]:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://app", timeout=10
    ) as client:
        if lifespan:
            async with app.router.lifespan_context(app):
                yield client
        else:
            yield client


def gateway_settings(**values: Any) -> GatewaySettings:
    return build_settings(GatewaySettings, {"api_keys": KEYS, **values})


async def test_every_gateway_route_but_health_needs_a_key() -> None:
    app = create_gateway(gateway_settings(), FakeBackend())
    found = routes(app)
    # Not vacuous: the API, the metrics and the schema pages are all listed.
    for expected in [
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions"),
        ("GET", "/v1/models"),
        ("GET", "/metrics"),
        ("GET", "/openapi.json"),
        ("GET", "/docs"),
    ]:
        assert expected in found
    refusals = [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": f"Bearer {KEYS[0]}x"},
        {"Authorization": f"Bearer {KEYS[0][:-1]}"},
        {"Authorization": f"Basic {KEYS[0]}"},
        {"Authorization": KEYS[0]},
        {"X-Api-Key": KEYS[0]},
        {INTERNAL_TOKEN_HEADER: KEYS[0]},
    ]
    async with asgi_client(app, lifespan=False) as client:
        # Paths that are no route are refused the same way: no probing.
        for method, path in [*found, ("GET", "/v1/secret-route"), ("POST", "/admin")]:
            if (method, path) in OPEN:
                response = await client.request(method, path)
                assert response.status_code == 200, (method, path)
                continue
            for headers in refusals:
                response = await client.request(
                    method, path, headers=headers, **body_for(method)
                )
                assert response.status_code == 401, (method, path, headers)
                assert response.headers["www-authenticate"] == "Bearer"
                if method != "HEAD":
                    error = response.json()["error"]
                    assert error["type"] == "authentication_error"
                    assert error["code"] == "invalid_api_key"
                assert_no_secret(response.text)
            for key in KEYS:
                response = await client.request(
                    method,
                    path,
                    headers={"Authorization": f"bearer  {key} "},
                    **body_for(method),
                )
                assert response.status_code != 401, (method, path)
                assert_no_secret(response.text)


@pytest.mark.parametrize("service", ["controller", "worker"])
async def test_internal_endpoints_need_the_token(service: str) -> None:
    if service == "controller":
        app = controller_module.create_app(
            ControllerSettings(internal_token=TOKEN, health_check_interval=3600)
        )
        expected = {("POST", "/register_worker"), ("POST", "/worker_generate_stream")}
    else:
        settings = WorkerSettings(internal_token=TOKEN, model_name=MODEL)
        app = worker_module.create_app(settings, FakeEngine(), register=False)
        expected = {("POST", "/worker_generate_stream"), ("POST", "/count_token")}
    found = routes(app)
    assert expected <= set(found)
    async with asgi_client(app) as client:
        for method, path in [*found, ("GET", "/no-such-route")]:
            if (method, path) in OPEN:
                response = await client.request(method, path)
                assert response.status_code == 200, (method, path)
                continue
            for headers in (
                {},
                {INTERNAL_TOKEN_HEADER: ""},
                {INTERNAL_TOKEN_HEADER: TOKEN + "x"},
                {INTERNAL_TOKEN_HEADER: TOKEN.upper()},
                {"Authorization": f"Bearer {TOKEN}"},
            ):
                response = await client.request(
                    method, path, headers=headers, **body_for(method)
                )
                assert response.status_code == 401, (service, method, path, headers)
                assert_no_secret(response.text)
            response = await client.request(
                method, path, headers={INTERNAL_TOKEN_HEADER: TOKEN}, **body_for(method)
            )
            assert response.status_code != 401, (service, method, path)


async def test_rate_limits_hold_under_a_burst_per_key() -> None:
    burst = 10
    # The limiter's clock moves only when the test moves it, so no token is
    # refilled while the burst is served, however slowly.
    clock = ManualClock()
    app = create_gateway(
        gateway_settings(burst_per_key=burst, requests_per_second_per_key=1.0),
        FakeBackend(),
        clock=clock,
    )
    async with asgi_client(app, lifespan=False) as client:

        async def call(key: str) -> httpx.Response:
            return await client.get(
                "/v1/models", headers={"Authorization": f"Bearer {key}"}
            )

        # 40 concurrent requests on the first key, 8 on the second, interleaved.
        keys = [KEYS[0]] * 40
        for index in range(8):
            keys.insert(index * 5, KEYS[1])
        responses = await asyncio.gather(*(call(key) for key in keys))
        by_key = {key: [] for key in KEYS}
        for key, response in zip(keys, responses, strict=True):
            by_key[key].append(response)

        first = by_key[KEYS[0]]
        accepted = [r for r in first if r.status_code == 200]
        limited = [r for r in first if r.status_code == 429]
        assert len(accepted) == burst
        assert len(limited) == len(first) - burst
        for response in limited:
            error = response.json()["error"]
            assert error["type"] == "rate_limit_error"
            assert error["code"] == "rate_limit_exceeded"
            # An empty bucket at one request/s: a token in 1 s.
            assert response.headers["retry-after"] == "1"
            assert_no_secret(response.text)
        # The other key kept its own bucket.
        assert [r.status_code for r in by_key[KEYS[1]]] == [200] * 8
        # Retry-After is honest: refused just before it, served after it.
        clock.advance(0.5)
        assert (await call(KEYS[0])).status_code == 429
        clock.advance(0.5)
        assert (await call(KEYS[0])).status_code == 200


async def test_concurrency_limits_hold_under_a_burst_per_key() -> None:
    backend = FakeBackend()
    backend.gate = asyncio.Event()
    app = create_gateway(gateway_settings(max_concurrent_per_key=3), backend)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
    async with asgi_client(app, lifespan=False) as client:

        async def call(key: str) -> httpx.Response:
            return await client.post(
                "/v1/chat/completions",
                json=body,
                headers={"Authorization": f"Bearer {key}"},
            )

        first = [asyncio.create_task(call(KEYS[0])) for _ in range(10)]
        for _ in range(200):  # until the admitted ones wait in the backend
            if len(backend.calls) >= 3 and sum(t.done() for t in first) >= 7:
                break
            await asyncio.sleep(0.01)
        refused = [t.result() for t in first if t.done()]
        assert len(refused) == 7
        for response in refused:
            assert response.status_code == 429
            assert response.json()["error"]["code"] == "concurrency_limit_exceeded"
            assert response.headers["retry-after"] == "1"
        # The other key is not held up by the first one's slots.
        second = [asyncio.create_task(call(KEYS[1])) for _ in range(3)]
        for _ in range(200):
            if len(backend.calls) >= 6:
                break
            await asyncio.sleep(0.01)
        assert len(backend.calls) == 6
        backend.gate.set()
        done = await asyncio.wait_for(asyncio.gather(*first, *second), 10)
        assert sum(r.status_code == 200 for r in done) == 6
        # Slots are given back when responses end.
        assert (await call(KEYS[0])).status_code == 200


@pytest.fixture
def debug_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.DEBUG)
    for name in ("httpx", "httpcore", "uvicorn", "uvicorn.error", "uvicorn.access"):
        caplog.set_level(logging.DEBUG, logger=name)
    yield caplog


@pytest.mark.timeout(120)
async def test_no_secret_in_logs_or_error_bodies(
    debug_logs: pytest.LogCaptureFixture,
) -> None:
    """A whole deployment in process (controller and worker on loopback, the
    gateway over ASGI with its real controller client), logging at DEBUG,
    through successes and every kind of failure."""
    controller_settings = ControllerSettings(
        internal_token=TOKEN, health_check_interval=0.2
    )
    bodies: list[str] = []
    with serving(controller_module.create_app(controller_settings)) as controller:
        port = int(controller.url.rsplit(":", 1)[1])
        # A worker app served on loopback that registers and heartbeats with
        # the token, then one that uses a wrong token.
        engine = FakeEngine()
        worker_values = {
            "internal_token": TOKEN,
            "model_name": MODEL,
            "controller_port": port,
            "heartbeat_interval": 0.2,
            "log_level": "debug",
        }
        with serving(
            worker_module.create_app(
                WorkerSettings(**worker_values, worker_address="http://placeholder"),
                engine,
                register=False,
            )
        ) as worker:
            registering = worker_module.create_app(
                WorkerSettings(**worker_values, worker_address=worker.url), engine
            )
            impostor = worker_module.create_app(
                WorkerSettings(
                    **{**worker_values, "internal_token": "wrong-" + TOKEN[6:]},
                    worker_address="http://127.0.0.1:9",
                ),
                engine,
            )
            async with (
                registering.router.lifespan_context(registering),
                impostor.router.lifespan_context(impostor),
            ):
                gateway = create_gateway(
                    gateway_settings(
                        internal_token=TOKEN, controller_port=port, log_level="debug"
                    )
                )
                wrong_token_gateway = create_gateway(
                    gateway_settings(
                        internal_token="not-" + TOKEN, controller_port=port
                    )
                )
                async with (
                    asgi_client(gateway) as client,
                    asgi_client(wrong_token_gateway) as other,
                ):
                    await _wait_until_routable(controller.url)
                    for response in await _exercise(client, other, controller.url):
                        bodies.append(response.text)
                # A dead worker in the routing table: calls to it fail and log.
                async with httpx.AsyncClient(
                    base_url=controller.url,
                    headers={INTERNAL_TOKEN_HEADER: TOKEN},
                    trust_env=False,
                ) as internal:
                    await internal.post(
                        "/register_worker",
                        json={
                            "worker_name": "http://127.0.0.1:9",
                            "worker_status": {"model_names": [MODEL]},
                        },
                    )
                    async with asgi_client(gateway) as client:
                        for _ in range(4):
                            reply = await client.post(
                                "/v1/completions",
                                json={"model": MODEL, "prompt": "x"},
                                headers={"Authorization": f"Bearer {KEYS[1]}"},
                            )
                            bodies.append(reply.text)
    logged = debug_logs.text
    # Not vacuous: the flows above did log, at DEBUG, including failures.
    assert "DEBUG" in logged and "WARNING" in logged
    assert "401" in logged
    assert_no_secret(logged)
    for record in debug_logs.records:
        assert_no_secret(repr(record.args))
    for body in bodies:
        assert_no_secret(body)
    for settings in (
        gateway_settings(internal_token=TOKEN),
        ControllerSettings(internal_token=TOKEN),
    ):
        assert_no_secret(repr(settings) + str(settings))


async def _wait_until_routable(controller_url: str) -> None:
    """Until the controller routes to the worker: listed is not enough, a
    worker gets traffic only after a probe has seen its proof of the token."""
    async with httpx.AsyncClient(
        base_url=controller_url,
        headers={INTERNAL_TOKEN_HEADER: TOKEN},
        trust_env=False,
    ) as internal:
        for _ in range(100):
            reply = await internal.post("/get_worker_address", json={"model": MODEL})
            if reply.status_code == 200 and reply.json()["address"]:
                return
            await asyncio.sleep(0.1)
    raise AssertionError("the controller never routed to the worker")


async def _exercise(
    client: httpx.AsyncClient, other: httpx.AsyncClient, controller_url: str
) -> list[httpx.Response]:
    good = {"Authorization": f"Bearer {KEYS[0]}"}
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    responses = [
        await client.post("/v1/chat/completions", json=chat, headers=good),
        await client.post(
            "/v1/chat/completions", json={**chat, "stream": True}, headers=good
        ),
        await client.post("/v1/chat/completions", json=chat),
        await client.post(
            "/v1/chat/completions",
            json=chat,
            headers={"Authorization": f"Bearer {KEYS[0]}-{TOKEN}"},
        ),
        await client.post(
            "/v1/chat/completions", json={**chat, "model": "gpt-9"}, headers=good
        ),
        await client.post(
            "/v1/chat/completions",
            json={**chat, "temperature": KEYS[1]},
            headers=good,
        ),
        await client.get("/metrics", headers=good),
        # The gateway with the wrong internal token: refused by the controller.
        await other.post("/v1/chat/completions", json=chat, headers=good),
    ]
    assert [r.status_code for r in responses[:3]] == [200, 200, 401]
    assert responses[-1].status_code == 503
    async with httpx.AsyncClient(trust_env=False) as raw:
        for headers in ({}, {INTERNAL_TOKEN_HEADER: KEYS[0]}):
            reply = await raw.post(f"{controller_url}/list_models", headers=headers)
            assert reply.status_code == 401
            responses.append(reply)
    return responses


def _ray_logs_of(pid: int) -> list[Path]:
    """The Ray worker log files of the actor process pid (newest session)."""
    found = sorted(
        Path("/tmp/ray").glob(f"session_*/logs/worker-*-{pid}.*"),
        key=lambda p: p.stat().st_mtime,
    )
    if not found:
        return []
    session = found[-1].parents[1]
    return [p for p in found if p.parents[1] == session]


@pytest.mark.slow
def test_the_real_stack_keeps_its_key_out_of_its_logs(stack) -> None:
    from qwen_vllm.loadgen.procs import listening_pids

    headers = {"Authorization": f"Bearer {stack.api_key}"}
    wrong = {"Authorization": f"Bearer {stack.api_key}-wrong"}
    chat = {
        "model": stack.model,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 2,
    }
    with httpx.Client(base_url=stack.gateway, timeout=60, trust_env=False) as client:
        assert client.post(
            "/v1/chat/completions", json=chat, headers=headers
        ).is_success
        for reply in (
            client.post("/v1/chat/completions", json=chat, headers=wrong),
            client.post(
                "/v1/chat/completions", json={**chat, "n": 99}, headers=headers
            ),
        ):
            assert reply.status_code in (400, 401)
            assert stack.api_key not in reply.text
    files = [stack.log]
    for port in (stack.port, stack.controller_port, stack.worker_port):
        for pid in listening_pids(port):
            files += _ray_logs_of(pid)
    assert len(files) >= 4, files  # the serve log and three actors' logs
    for path in files:
        assert stack.api_key not in path.read_text(errors="replace"), path
