"""Each component run on its own (controller, worker, gateway, web UI) stops
on Ctrl-C or SIGTERM within 30 s, in every state, and leaves nothing behind (a
worker's vLLM engine core above all).
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.processes import (
    ProcessTracker,
    clean_env,
    cleanup,
    start_in_session,
    stop_and_check,
    wait_for_output,
)

pytestmark = pytest.mark.slow

QWEN_VLLM = str(Path(sys.executable).with_name("qwen-vllm"))


def start(kind: str, tmp_path: Path, *args: str):
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    log = tmp_path / f"{kind}-{len(list(tmp_path.glob('*.log')))}.log"
    proc = start_in_session([QWEN_VLLM, kind, *args], log, clean_env(home))
    return proc, ProcessTracker(proc.pid), log


@pytest.mark.timeout(900)
def test_controller_and_worker_stop_clean_while_starting_and_serving(
    tmp_path, demo_dir
):
    controller_port = free_port()
    controller, controller_tracker, controller_log = start(
        "controller", tmp_path, "--controller-port", str(controller_port)
    )
    worker_args = [
        "--model",
        str(demo_dir),
        "--enforce-eager",
        "--worker-port",
        str(free_port()),
        "--controller-address",
        f"http://127.0.0.1:{controller_port}",
    ]
    try:
        wait_for_output(controller, controller_log, "listening on", 120)

        # SIGTERM (a supervisor) while the engine is loading.
        worker, tracker, log = start("worker", tmp_path, *worker_args)
        try:
            wait_for_output(worker, log, "starting vLLM on", 300)
            wait_for_output(worker, log, "EngineCore", 300)
            code, took = stop_and_check(worker, tracker, log, signal.SIGTERM, False)
            assert code == 130, code  # interrupted, as after Ctrl-C
            print(f"\nworker stopped while starting in {took:.1f} s")
        finally:
            cleanup(worker, tracker)

        # Ctrl-C (the whole group) while serving and registered.
        worker, tracker, log = start("worker", tmp_path, *worker_args)
        try:
            wait_for_output(worker, log, "worker listening on", 600)
            code, took = stop_and_check(worker, tracker, log, signal.SIGINT, True)
            print(f"worker stopped while serving in {took:.1f} s")
        finally:
            cleanup(worker, tracker)

        for kind, port_flag in (("gateway", "--port"), ("webui", "--webui-port")):
            front, tracker, log = start(
                kind,
                tmp_path,
                port_flag,
                str(free_port()),
                "--controller-address",
                f"http://127.0.0.1:{controller_port}",
            )
            try:
                wait_for_output(front, log, f"{kind} listening on", 120)
                code, took = stop_and_check(front, tracker, log, signal.SIGTERM, False)
                print(f"{kind} stopped in {took:.1f} s")
            finally:
                cleanup(front, tracker)

        code, took = stop_and_check(
            controller, controller_tracker, controller_log, signal.SIGTERM, False
        )
        print(f"controller stopped in {took:.1f} s")
    finally:
        cleanup(controller, controller_tracker)
