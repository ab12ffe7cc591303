"""Process resources through psutil: resident memory, open file descriptors, and
the processes listening on a TCP port.

Used by the soak mode of the load generator and by the fault-injection tests
to find the processes of a deployment (a Ray actor is simply the process that
listens on its service's port).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import httpx
import psutil


@dataclass(frozen=True)
class ProcSample:
    pid: int
    rss_bytes: int
    open_fds: int


def sample(pid: int) -> ProcSample | None:
    """Resident memory and open descriptors of pid; None once it has exited."""
    try:
        process = psutil.Process(pid)
        with process.oneshot():
            return ProcSample(pid, process.memory_info().rss, process.num_fds())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def listening_pids(port: int) -> list[int]:
    """Processes listening on this TCP port (IPv4 or v6).

    psutil names one process per socket: of processes sharing one listening
    socket (forked after listen()), only one is reported.
    """
    pids = {
        conn.pid
        for conn in psutil.net_connections(kind="tcp")
        if conn.status == psutil.CONN_LISTEN
        and conn.laddr
        and conn.laddr.port == port
        and conn.pid is not None
    }
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
