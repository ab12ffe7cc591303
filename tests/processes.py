"""What a command started, and what of it is still running.

Commands under test run in their own session (`start_new_session=True`), as a
terminal's foreground job would; everything they start is found by walking
their descendants and their session, and is told apart from a later process
that reuses a pid by its start time.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

# Exiting processes may take a moment to be reaped after their parent ends.
REAP_TIMEOUT_S = 10.0
# The product promises a stop within this.
STOP_TIMEOUT_S = 30.0


class ProcessTracker:
    """Every process seen under a root pid, with its start time."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.seen: dict[int, float] = {}

    def scan(self) -> dict[int, float]:
        found = {}
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.root).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    found[child.pid] = child.create_time()
        for proc in psutil.process_iter(["pid", "create_time"]):
            with contextlib.suppress(psutil.Error, OSError):
                if proc.pid != self.root and os.getsid(proc.pid) == self.root:
                    found[proc.pid] = proc.info["create_time"]
        self.seen.update(found)
        return found

    def alive(self) -> dict[int, str]:
        """Seen processes still running (zombies count as gone)."""
        left = {}
        for pid, started in self.seen.items():
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                if (
                    proc.create_time() == started
                    and proc.status() != psutil.STATUS_ZOMBIE
                ):
                    left[pid] = " ".join(proc.cmdline())[:200]
        return left

    def wait_all_gone(self, timeout: float = REAP_TIMEOUT_S) -> dict[int, str]:
        deadline = time.monotonic() + timeout
        while (left := self.alive()) and time.monotonic() < deadline:
            time.sleep(0.2)
        return left

    def kill_all(self) -> None:
        for pid in self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def start_in_session(
    command: Sequence[str], log: Path, env: dict[str, str], cwd: Path | None = None
) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(
            list(command),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )


def wait_for_output(
    proc: subprocess.Popen, log: Path, text: str, timeout: float
) -> float:
    """Seconds until text shows in the log; fails if the process ends first."""
    started = time.monotonic()
    while text not in log.read_text(errors="replace"):
        if proc.poll() is not None:
            raise AssertionError(
                f"exited with {proc.returncode} before printing {text!r}:\n" + tail(log)
            )
        if time.monotonic() - started > timeout:
            raise AssertionError(f"no {text!r} within {timeout:.0f} s:\n" + tail(log))
        time.sleep(0.2)
    return time.monotonic() - started


def tail(log: Path, chars: int = 4000) -> str:
    return log.read_text(errors="replace")[-chars:]


def clean_env(home: Path) -> dict[str, str]:
    """The environment of a user who set nothing for qwen_vllm, vLLM, Ray or
    Hugging Face, with a fresh home (so a fresh cache)."""
    prefixes = ("VLLM_", "HF_", "QWEN_VLLM_", "TOKENIZERS_", "RAY_", "XDG_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env["HOME"] = str(home)
    return env


def stop_and_check(
    proc: subprocess.Popen,
    tracker: ProcessTracker,
    log: Path,
    sig: int = signal.SIGINT,
    group: bool = True,
) -> tuple[int, float]:
    """Signal like a terminal (the group) or a supervisor (the pid); return
    (exit code, seconds to exit); fail if it takes too long or leaves any
    process behind."""
    tracker.scan()
    stopping = time.monotonic()
    if group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    try:
        code = proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"still running {STOP_TIMEOUT_S:.0f} s after {signal.Signals(sig).name}:"
            f"\n{tail(log)}"
        ) from None
    took = time.monotonic() - stopping
    left = tracker.wait_all_gone()
    assert not left, f"left running after the stop: {left}\n{tail(log)}"
    return code, took


def cleanup(proc: subprocess.Popen, tracker: ProcessTracker) -> None:
    """Whatever went wrong, leave nothing behind."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    tracker.kill_all()
