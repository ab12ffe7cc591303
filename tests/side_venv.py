"""Cached side virtualenvs for clients that cannot share the project's venv.

Some real clients pin libraries that conflict with ours (FastChat's web UI
needs Gradio 5, Qwen's examples the pre-1.0 `openai` client). Each runs from
its own virtualenv, built once per key under ~/.cache/qwen_vllm/<name>/<key>
and reused; a lock lets parallel test runs share the build.
"""

from __future__ import annotations

import fcntl
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

CACHE_ROOT = Path.home() / ".cache" / "qwen_vllm"
_READY = "qwen-vllm-ready"


def side_venv_python(
    name: str,
    key: str,
    requirements: Sequence[str],
    *,
    check_import: str,
    timeout: float = 1500.0,
) -> Path:
    """The python of the side venv `name`/`key`, built on first use.

    `key` must change whenever `requirements` do. `check_import` is imported
    once after the install, so a broken set of packages fails here, with
    pip's log, rather than later inside a test.
    """
    root = CACHE_ROOT / name
    venv = root / key
    python = venv / "bin" / "python"
    if (venv / _READY).exists():
        return python
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test run may be building it
        if (venv / _READY).exists():
            return python
        shutil.rmtree(venv, ignore_errors=True)
        deadline = time.monotonic() + timeout
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", str(venv)], check=True, timeout=120)
        log = root / f"{key}.pip.log"
        with open(log, "wb") as out:
            result = subprocess.run(
                [str(python), "-m", "pip", "install", *requirements],
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=max(60.0, deadline - time.monotonic()),
            )
        if result.returncode != 0:
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"pip failed for the {name} venv:\n{tail}")
        scratch = root / f"{key}.scratch"  # some imports write log files
        scratch.mkdir(exist_ok=True)
        subprocess.run(
            [str(python), "-c", f"import {check_import}"],
            check=True,
            timeout=300,
            cwd=scratch,
            capture_output=True,
        )
        shutil.rmtree(scratch, ignore_errors=True)
        (venv / _READY).write_text(key + "\n")
    return python
