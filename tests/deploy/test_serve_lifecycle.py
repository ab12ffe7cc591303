"""`qwen-vllm serve` when starting goes wrong, and stopping in every state.

A start-up failure reaches the terminal with its root cause and ends the
command with a non-zero status; Ctrl-C and SIGTERM stop it within 30 s while
it starts, crash-loops or serves, and leave no process behind.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.processes import (
    STOP_TIMEOUT_S,
    ProcessTracker,
    clean_env,
    cleanup,
    start_in_session,
    stop_and_check,
    tail,
    wait_for_output,
)

pytestmark = pytest.mark.slow

# vLLM sizes its cache blocks from this; one block cannot hold a 2048-token
# sequence, so the engine core fails at start, every time, after loading.
CRASHING_ENGINE = ["--engine-args", '{"num_gpu_blocks_override": 1}']
ENGINE_ROOT_CAUSE = "ValueError: No available memory for the cache blocks"


def serve_command(*extra: str) -> list[str]:
    serve = str(Path(sys.executable).with_name("qwen-vllm"))
    return [
        serve,
        "serve",
        "--no-webui",
        "--enforce-eager",
        "--port",
        str(free_port()),
        "--controller-port",
        str(free_port()),
        "--worker-port",
        str(free_port()),
        *extra,
    ]


def run_to_exit(
    tmp_path: Path, *extra: str, timeout: float
) -> tuple[int, str, float, ProcessTracker]:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    log = tmp_path / "serve.log"
    started = time.monotonic()
    proc = start_in_session(serve_command(*extra), log, clean_env(home))
    tracker = ProcessTracker(proc.pid)
    try:
        while proc.poll() is None:
            tracker.scan()
            assert time.monotonic() - started < timeout, (
                f"still running after {timeout:.0f} s:\n{tail(log)}"
            )
            time.sleep(0.5)
        return proc.returncode, tail(log, 20000), time.monotonic() - started, tracker
    finally:
        cleanup(proc, tracker)


@pytest.mark.timeout(300)
def test_a_cache_larger_than_the_machine_is_refused_with_the_numbers(tmp_path):
    code, output, took, tracker = run_to_exit(
        tmp_path, "--kv-cache-memory", "100000", timeout=120
    )
    assert code == 2, output
    lines = [line for line in output.splitlines() if "could not start" in line]
    assert len(lines) == 1, output
    message = lines[0]
    assert "worker-0 could not start: InsufficientMemory" in message
    assert "--kv-cache-memory 100000.00 GiB does not fit" in message
    assert "lower --kv-cache-memory to at most" in message
    # Our own refusal fails the same way every time: no second attempt.
    assert "attempt" not in output
    log = output.split("full log: ", 1)[1].split()[0]
    assert "InsufficientMemory" in Path(log).read_text(errors="replace")
    assert not tracker.wait_all_gone()
    print(f"\nrefused after {took:.0f} s")


@pytest.mark.timeout(600)
def test_a_crash_looping_start_stops_after_three_attempts_with_its_cause(tmp_path):
    code, output, took, tracker = run_to_exit(tmp_path, *CRASHING_ENGINE, timeout=480)
    assert code == 2, output
    for attempt in (1, 2):
        assert (
            f"worker-0 failed to start (attempt {attempt} of 3): {ENGINE_ROOT_CAUSE}"
            in output
        ), output
    assert f"worker-0 could not start: {ENGINE_ROOT_CAUSE}" in output, output
    assert "attempt 3 of 3" not in output
    # Ray's own paragraph about a dead worker never reaches the terminal.
    assert "(raylet)" not in output and "A worker died" not in output
    log = output.split("full log: ", 1)[1].split()[0]
    assert ENGINE_ROOT_CAUSE in Path(log).read_text(errors="replace")
    assert not tracker.wait_all_gone()
    print(f"\ngave up after {took:.0f} s")


@pytest.mark.parametrize(
    ("state", "extra", "evidence", "sig", "group"),
    [
        # Ctrl-C at the terminal (the whole foreground group) mid crash loop.
        (
            "crash-looping",
            CRASHING_ENGINE,
            "failed to start (attempt 1 of 3)",
            signal.SIGINT,
            True,
        ),
        # A supervisor's SIGTERM to the command alone, while the engine loads.
        ("starting", [], "starting: 0/1 worker(s) ready", signal.SIGTERM, False),
    ],
)
@pytest.mark.timeout(600)
def test_a_stop_in_any_state_leaves_nothing(
    tmp_path, state, extra, evidence, sig, group
):
    home = tmp_path / "home"
    home.mkdir()
    log = tmp_path / "serve.log"
    proc = start_in_session(serve_command(*extra), log, clean_env(home))
    tracker = ProcessTracker(proc.pid)
    try:
        wait_for_output(proc, log, evidence, 420)
        code, took = stop_and_check(proc, tracker, log, sig, group)
        assert code == 0, tail(log)
        assert took < STOP_TIMEOUT_S
        print(f"\n{state}: stopped in {took:.1f} s, {len(tracker.seen)} processes")
    finally:
        cleanup(proc, tracker)
