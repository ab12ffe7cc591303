"""Process resources from /proc: resident memory, open file descriptors, and the
process listening on a TCP port.

Used by the soak mode of the load generator and by the fault-injection tests
to find the processes of a deployment (a Ray actor is simply the process that
listens on its service's port). Linux only; pure Python.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

PROC = Path("/proc")
_TCP_LISTEN = "0A"


@dataclass(frozen=True)
class ProcSample:
    pid: int
    rss_bytes: int
    open_fds: int


def sample(pid: int) -> ProcSample | None:
    """Resident memory and open descriptors of pid; None once it has exited."""
    try:
        status = (PROC / str(pid) / "status").read_text()
        fds = len(os.listdir(PROC / str(pid) / "fd"))
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    rss = 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024  # reported in kB
            break
    return ProcSample(pid, rss, fds)


def _listening_inodes(port: int) -> set[str]:
    inodes: set[str] = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(FileNotFoundError):
            lines = (PROC / "net" / table).read_text().splitlines()[1:]
            for line in lines:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state == _TCP_LISTEN and int(local.rsplit(":", 1)[1], 16) == port:
                    inodes.add(inode)
    return inodes


def listening_pids(port: int) -> list[int]:
    """Processes holding a socket that listens on this TCP port."""
    inodes = _listening_inodes(port)
    if not inodes:
        return []
    wanted = {f"socket:[{inode}]" for inode in inodes}
    pids = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fds = list((entry / "fd").iterdir())
        except OSError:  # gone, or not ours to read
            continue
        for fd in fds:
            try:
                link = os.readlink(fd)
            except OSError:  # closed meanwhile (the listing's own fd, at least)
                continue
            if link in wanted:
                pids.append(int(entry.name))
                break
    return sorted(pids)


def worker_pid(url: str, timeout: float = 5.0) -> int | None:
    """The pid a qwen_vllm worker reports on GET /health (None if it cannot)."""
    try:
        with httpx.Client(trust_env=False, timeout=timeout) as client:
            reply = client.get(url.rstrip("/") + "/health")
        pid = reply.json().get("pid")
    except (httpx.HTTPError, ValueError, AttributeError):
        return None
    return pid if isinstance(pid, int) else None


PidSource = Callable[[], int | None]


def pid_source(spec: str) -> tuple[str, PidSource]:
    """A label and a resolver for `--watch` specs: PID, port:N or an http URL.

    Resolved at every sample, so a restarted service is followed to its new
    process.
    """
    if spec.isdigit():
        pid = int(spec)
        return f"pid {pid}", lambda: pid
    if spec.startswith("port:"):
        port = int(spec.removeprefix("port:"))

        def on_port() -> int | None:
            pids = listening_pids(port)
            return pids[0] if pids else None

        return f"port {port}", on_port
    if spec.startswith(("http://", "https://")):
        return spec, lambda: worker_pid(spec)
    raise ValueError(
        f"cannot watch {spec!r}: give a PID, port:N (the process listening on "
        "that port) or a worker URL (its /health reports its pid)"
    )
