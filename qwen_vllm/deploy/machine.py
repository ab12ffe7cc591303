"""What this node offers a launch plan: its GPUs, CPU cores and free ports.

Also LaunchError, the one error every launch check raises: what is wrong and
what to do about it, printed without a traceback.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass


class LaunchError(Exception):
    """What is wrong and what to do about it; printed without a traceback."""


def bind_error(host: str, port: int) -> str | None:
    """Why `port` on `host` cannot be listened on now ("Address already in
    use"), or None if it can."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


@dataclass(frozen=True)
class Machine:
    """What this node offers, as the plan sees it."""

    gpu_ids: tuple[str, ...]  # CUDA device ids the plan may hand out, in order
    gpu_source: str  # where gpu_ids came from, for messages
    cpu_count: int  # os.cpu_count(): what `serve` numbers CPU cores against
    usable_cores: frozenset[int]  # cores this process may run on
    hidden_gpus: bool = False  # GPUs exist but --gpus 0 asked for the CPU


def check_gpus_flag(gpus: int) -> None:
    if gpus < 0:
        raise LaunchError("--gpus must be 0 (CPU) or a positive GPU count")


def nvidia_smi_gpus(environ: Mapping[str, str]) -> tuple[list[str], str]:
    """GPU indices listed by `nvidia-smi -L`, and how they were found."""
    smi = shutil.which("nvidia-smi", path=environ.get("PATH"))
    if smi is None:
        return [], "nvidia-smi not found"
    try:
        done = subprocess.run(
            [smi, "-L"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [], f"nvidia-smi -L failed: {exc}"
    if done.returncode != 0:
        reason = done.stderr.strip() or f"exit code {done.returncode}"
        return [], f"nvidia-smi -L failed: {reason}"
    # MIG devices are indented under their GPU; only whole GPUs count.
    return re.findall(r"^GPU (\d+):", done.stdout, re.MULTILINE), "nvidia-smi -L"


def detect_machine(
    gpus: int | None, environ: Mapping[str, str] | None = None
) -> Machine:
    """This node's GPUs (nvidia-smi, CUDA_VISIBLE_DEVICES, --gpus) and cores."""
    env = os.environ if environ is None else environ
    listed, source = nvidia_smi_gpus(env)
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if listed and visible is not None:
        # Respect a restriction already in place (a scheduler's, or the user's).
        listed = [d.strip() for d in visible.split(",") if d.strip()][: len(listed)]
        source = f"nvidia-smi -L, restricted by CUDA_VISIBLE_DEVICES={visible}"
    hidden = False
    if gpus is not None:
        check_gpus_flag(gpus)
        if listed and gpus > len(listed):
            raise LaunchError(
                f"--gpus {gpus}, but only {len(listed)} GPU(s) are visible "
                f"({source}); pass --gpus {len(listed)} or less"
            )
        if listed:
            hidden = gpus == 0
            listed = listed[:gpus]
            source = f"--gpus {gpus} of {source}"
        else:
            listed = [str(i) for i in range(gpus)]
            source = f"--gpus {gpus} (not checked: {source})"
    try:
        usable = frozenset(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = frozenset(range(os.cpu_count() or 1))
    return Machine(
        gpu_ids=tuple(listed),
        gpu_source=source,
        cpu_count=os.cpu_count() or 1,
        usable_cores=usable,
        hidden_gpus=hidden,
    )
