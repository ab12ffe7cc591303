"""Start real server processes for tests and wait until they answer."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx


def wait_for_http(
    url: str, timeout: float, proc: subprocess.Popen | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"server exited with code {proc.returncode} before {url} answered"
            )
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


def wait_for_model(
    gateway: str,
    model: str,
    api_key: str,
    proc: subprocess.Popen,
    log: Path,
    timeout: float = 600.0,
) -> None:
    """Wait until the gateway at `gateway` lists `model` (its worker is up)."""
    headers = {"Authorization": f"Bearer {api_key}"}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"{proc.args[0]} exited with {proc.returncode} before serving:\n"
                + log.read_text(errors="replace")[-4000:]
            )
        with contextlib.suppress(httpx.HTTPError):
            reply = httpx.get(f"{gateway}/v1/models", headers=headers, timeout=5)
            if reply.status_code == 200 and model in [
                m["id"] for m in reply.json()["data"]
            ]:
                return
        time.sleep(2)
    raise AssertionError(
        f"no model served within {timeout:.0f} s:\n"
        + log.read_text(errors="replace")[-4000:]
    )


@contextlib.contextmanager
def running(
    cmd: Sequence[str],
    health_url: str,
    *,
    log: Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 300.0,
) -> Iterator[subprocess.Popen]:
    """Run cmd in its own process group; stop the whole group afterwards."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            list(cmd),
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            start_new_session=True,
        )
        try:
            try:
                wait_for_http(health_url, timeout, proc)
            except (RuntimeError, TimeoutError) as exc:
                tail = log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{exc}\n--- {log} ---\n{tail}") from exc
            yield proc
        finally:
            stop(proc)


def stop(proc: subprocess.Popen, grace: float = 20.0) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def venv_bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


@contextlib.contextmanager
def fastchat_openai_api_server(controller: str, workdir: Path) -> Iterator[str]:
    """FastChat's own `python -m fastchat.serve.openai_api_server` on a
    controller; yields its API's base URL (.../v1). FastChat writes its log
    files into its working directory, `workdir`."""
    from tests.conftest import free_port

    port = free_port()
    cmd = [
        venv_bin("python"),
        "-m",
        "fastchat.serve.openai_api_server",
        "--controller-address",
        controller,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    url = f"http://127.0.0.1:{port}/v1"
    log = workdir / "fastchat-api.log"
    with running(cmd, f"{url}/models", log=log, env={"PYTHONPATH": ""}, cwd=workdir):
        yield url
