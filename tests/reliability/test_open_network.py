"""A deployment bound to every interface, attacked from the same network.

`qwen-vllm serve --host 0.0.0.0 --api-key KEY` is what a user runs in a
container or on a cluster node. An attacker who reaches the controller port
runs a worker of its own that claims the served model and tries to register
it, to read users' prompts and write their answers. Traffic stays on
loopback; the services listen on 0.0.0.0 as they would on a network.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from qwen_vllm.deploy.machine import bind_error
from qwen_vllm.serving.security import (
    CHALLENGE_HEADER,
    INTERNAL_TOKEN_HEADER,
    PROOF_HEADER,
    Exposure,
    exposure,
    guard,
    token_proof,
)
from qwen_vllm.serving.settings import (
    ControllerSettings,
    GatewaySettings,
    ServeSettings,
    WebUISettings,
    WorkerSettings,
)
from tests.conftest import free_port
from tests.servers import running, venv_bin, wait_for_model
from tests.serving.test_controller import serving

API_KEY = "sk-user-open-net"
MODEL = "qwen-v1-demo"
CHATS = 8
SERVICE_PORT_FLAG = {
    "controller": "--controller-port",
    "worker": "--worker-port",
    "gateway": "--port",
    "webui": "--webui-port",
}
SETTINGS = {
    "controller": ControllerSettings,
    "worker": WorkerSettings,
    "gateway": GatewaySettings,
    "webui": WebUISettings,
    "serve": ServeSettings,
}


# -- the policy, one component at a time ------------------------------------


@pytest.mark.parametrize("kind", sorted(SETTINGS))
@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_loopback_needs_no_token(kind: str, host: str) -> None:
    assert exposure(kind, SETTINGS[kind](host=host), 1) == Exposure()


@pytest.mark.parametrize("kind", sorted(SETTINGS))
@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "node-1.cluster"])
def test_a_network_address_without_a_token_is_refused(kind: str, host: str) -> None:
    refusal = exposure(kind, SETTINGS[kind](host=host), 21001).refusal
    assert refusal is not None
    assert f"{kind} on {host}:21001" in refusal
    assert "QWEN_VLLM_INTERNAL_TOKEN" in refusal
    assert "--insecure-no-internal-token" in refusal


def test_the_opt_out_starts_and_says_who_can_call() -> None:
    settings = ControllerSettings(host="0.0.0.0", insecure_no_internal_token=True)
    exposed = exposure("controller", settings, 21001)
    assert exposed.refusal is None
    assert len(exposed.warnings) == 1
    assert "anyone who reaches them" in exposed.warnings[0]


@pytest.mark.parametrize(
    ("kind", "values", "warned"),
    [
        ("gateway", {}, ["--api-key"]),
        ("gateway", {"api_keys": ["sk-x"]}, []),
        ("webui", {}, ["--webui-password"]),
        ("webui", {"webui_password": "pw"}, []),
        ("serve", {}, ["--api-key", "--webui-password"]),
        ("serve", {"webui": False}, ["--api-key"]),
        ("serve", {"api_keys": ["sk-x"], "webui_password": "pw"}, []),
        ("controller", {}, []),
    ],
)
def test_an_open_front_end_warns(kind: str, values: dict, warned: list[str]) -> None:
    settings = SETTINGS[kind](host="0.0.0.0", internal_token="t0k3n", **values)
    exposed = exposure(kind, settings, 8000)
    assert exposed.refusal is None
    assert [w.split(":")[0] for w in exposed.warnings] == [
        f"no {flag}" for flag in warned
    ]


async def test_only_a_service_with_the_token_answers_a_challenge() -> None:
    app = FastAPI()
    guard(app, "the-token")

    @app.post("/worker_get_status")
    async def status() -> dict[str, Any]:
        return {"model_names": ["m"], "speed": 1, "queue_length": 0}

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://w") as client:
        reply = await client.post(
            "/worker_get_status",
            headers={INTERNAL_TOKEN_HEADER: "the-token", CHALLENGE_HEADER: "c-1"},
        )
        assert reply.status_code == 200
        assert reply.headers[PROOF_HEADER] == token_proof("the-token", "c-1")
        assert reply.headers[PROOF_HEADER] != token_proof("the-token", "c-2")
        assert reply.headers[PROOF_HEADER] != token_proof("other", "c-1")
        plain = await client.post(
            "/worker_get_status", headers={INTERNAL_TOKEN_HEADER: "the-token"}
        )
        assert PROOF_HEADER not in plain.headers
        wrong = await client.post(
            "/worker_get_status",
            headers={INTERNAL_TOKEN_HEADER: "guess", CHALLENGE_HEADER: "c-1"},
        )
        assert wrong.status_code == 401
        assert PROOF_HEADER not in wrong.headers


# -- the real command line ---------------------------------------------------


def run_to_end(command: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run command in its own process group; kill the whole group if it is
    still running after timeout (a service that started instead of refusing)."""
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{command} still running after {timeout:.0f} s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(SERVICE_PORT_FLAG))
def test_each_component_refuses_to_start_open(kind: str) -> None:
    port = free_port()
    command = [
        venv_bin("qwen-vllm"),
        kind,
        "--host",
        "0.0.0.0",
        SERVICE_PORT_FLAG[kind],
        str(port),
    ]
    done = run_to_end(command, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"qwen-vllm {kind}: error: {kind} on 0.0.0.0:{port}")
    assert "QWEN_VLLM_INTERNAL_TOKEN" in done.stderr
    assert "Traceback" not in done.stderr
    assert bind_error("0.0.0.0", port) is None, "nothing may have listened"


@pytest.mark.slow
def test_a_controller_opted_out_takes_any_worker_and_warns(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "controller.log"
    command = [
        venv_bin("qwen-vllm"),
        "controller",
        "--host",
        "0.0.0.0",
        "--controller-port",
        str(port),
        "--insecure-no-internal-token",
    ]
    with running(command, f"http://127.0.0.1:{port}/health", log=log):
        reply = httpx.post(
            f"http://127.0.0.1:{port}/register_worker",
            json={
                "worker_name": "http://127.0.0.1:9",
                "check_heart_beat": False,
                "worker_status": {
                    "model_names": [MODEL],
                    "speed": 1,
                    "queue_length": 0,
                },
            },
            timeout=10,
        )
        assert reply.status_code == 200, reply.text
    text = log.read_text(errors="replace")
    assert (
        "warning: --insecure-no-internal-token: controller and worker endpoints" in text
    )


# -- the attack on a whole deployment ----------------------------------------


def impostor_app(seen: list[str]) -> FastAPI:
    """A worker of the attacker's own: claims the model, records every call."""
    app = FastAPI()

    @app.middleware("http")
    async def record(request: Request, call_next: Any) -> Any:
        seen.append(f"{request.method} {request.url.path}")
        return await call_next(request)

    @app.post("/worker_get_status")
    async def status() -> dict[str, Any]:
        return {"model_names": [MODEL], "speed": 100, "queue_length": 0}

    @app.post("/worker_generate_stream")
    async def generate(request: Request) -> StreamingResponse:
        await request.json()

        async def chunks() -> AsyncIterator[bytes]:
            yield json.dumps({"text": "impostor", "error_code": 0}).encode() + b"\0"

        return StreamingResponse(chunks())

    return app


@contextmanager
def open_serve(
    tmp_path: Path, *extra: str
) -> Iterator[tuple[dict[str, int], subprocess.Popen]]:
    ports = {name: free_port() for name in ("port", "controller", "worker")}
    command = [
        venv_bin("qwen-vllm"),
        "serve",
        "--host",
        "0.0.0.0",
        "--api-key",
        API_KEY,
        "--no-webui",
        "--port",
        str(ports["port"]),
        "--controller-port",
        str(ports["controller"]),
        "--worker-port",
        str(ports["worker"]),
        *extra,
    ]
    log = tmp_path / "serve.log"
    with running(command, f"http://127.0.0.1:{ports['port']}/health", log=log) as proc:
        gateway = f"http://127.0.0.1:{ports['port']}"
        wait_for_model(gateway, MODEL, API_KEY, proc, log)
        yield ports, proc


@pytest.mark.slow
@pytest.mark.parametrize("token", ["none given", "given by the user"])
def test_an_impostor_worker_gets_no_prompt(tmp_path: Path, token: str) -> None:
    extra = (
        ["--internal-token", "itok-user-chosen-8d2f"] if token != "none given" else []
    )
    seen: list[str] = []
    with (
        open_serve(tmp_path, *extra) as (ports, serve),
        serving(impostor_app(seen)) as impostor,
    ):
        controller = f"http://127.0.0.1:{ports['controller']}"
        claim = {
            "worker_name": impostor.url,
            "check_heart_beat": False,
            "worker_status": {"model_names": [MODEL], "speed": 100, "queue_length": 0},
        }
        for headers in (
            {},
            {INTERNAL_TOKEN_HEADER: "guess"},
            {INTERNAL_TOKEN_HEADER: ""},
        ):
            reply = httpx.post(
                f"{controller}/register_worker", json=claim, headers=headers, timeout=10
            )
            assert reply.status_code == 401, reply.text
            for path in ("/list_models", "/get_worker_address", "/workers"):
                assert (
                    httpx.post(
                        f"{controller}{path}", json={"model": MODEL}, headers=headers
                    ).status_code
                    == 401
                )
        worker = f"http://127.0.0.1:{ports['worker']}"
        stream = httpx.post(
            f"{worker}/worker_generate_stream",
            json={"model": MODEL, "prompt": "steal", "max_new_tokens": 4},
            timeout=10,
        )
        assert stream.status_code == 401

        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{ports['port']}/v1",
            api_key=API_KEY,
            max_retries=0,
            timeout=120,
        )
        answers = [
            client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": f"secret {i}"}],
                max_tokens=4,
                temperature=0,
            )
            .choices[0]
            .message.content
            for i in range(CHATS)
        ]
        ray_refuses_a_stranger(serve.pid, tmp_path)
    assert len(answers) == CHATS
    assert "impostor" not in answers
    assert seen == [], f"the impostor was called: {seen}"


def gcs_port(serve_pid: int) -> int:
    """The port of the Ray GCS that `qwen-vllm serve` started."""
    for child in psutil.Process(serve_pid).children(recursive=True):
        if child.name() == "gcs_server":
            return next(
                c.laddr.port
                for c in child.net_connections(kind="tcp")
                if c.status == psutil.CONN_LISTEN
            )
    raise AssertionError("no gcs_server among the serve process's descendants")


def ray_refuses_a_stranger(serve_pid: int, tmp_path: Path) -> None:
    """A Ray driver without the token (and no token file in its home) is
    turned away by the GCS: the cluster runs nobody else's code."""
    home = tmp_path / "stranger"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["HOME"] = str(home)
    script = (
        "import ray; "
        f"ray.init(address='127.0.0.1:{gcs_port(serve_pid)}', log_to_driver=False); "
        "print('CONNECTED', flush=True)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    refused = "Authentication token is missing or incorrect"
    lines: list[str] = []
    deadline = time.monotonic() + 120
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # ends when the process exits
            lines.append(line)
            if refused in line or "CONNECTED" in line or time.monotonic() > deadline:
                break
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    output = "".join(lines)
    assert "CONNECTED" not in output
    assert refused in output, output[-3000:]
