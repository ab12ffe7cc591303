"""A command's processes: stopped on Ctrl-C or SIGTERM, none left behind.

vLLM's engine cores, tensor-parallel ranks and Ray's daemons (GCS, raylet,
dashboard and runtime-env agents, log monitor) are started by the command's
children and can outlive them: a rank whose parent died, an agent Ray forgot.
The command makes itself a child subreaper, so such orphans become its own
children, and on its way out it ends every descendant still running.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil

logger = logging.getLogger(__name__)

_PR_SET_CHILD_SUBREAPER = 36
GRACE_S = 5.0


def adopt_orphans() -> None:
    """Orphaned descendants are re-parented to this process (Linux)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def end_descendants(grace: float = GRACE_S) -> list[int]:
    """SIGTERM every descendant, SIGKILL those alive after grace; their pids."""
    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return []
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.terminate()
    _, alive = psutil.wait_procs(children, timeout=grace)
    for child in alive:
        with contextlib.suppress(psutil.Error):
            child.kill()
    psutil.wait_procs(alive, timeout=grace)
    return [child.pid for child in children]


# A clean stop that takes longer than this is forced.
FORCE_AFTER_S = 20.0


def force_exit(code: int = 130) -> None:
    """Kill every descendant at once and exit without cleaning up."""
    end_descendants(grace=0.0)
    os._exit(code)


class StopSignals:
    """The first Ctrl-C or SIGTERM asks for a clean stop; a second one forces.

    With `interrupt`, the first also raises KeyboardInterrupt in the main
    thread, to break out of whatever start-up step it is in. Whatever the
    clean stop runs into, it is forced after FORCE_AFTER_S; forcing kills
    every descendant at once and exits with status 130.
    """

    def __init__(
        self,
        interrupt: bool = False,
        signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM),
    ) -> None:
        self.interrupt = interrupt
        self.signals = signals
        self.requested = threading.Event()
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested.is_set():
            sys.stderr.write("\nforced stop: killing everything now\n")
            sys.stderr.flush()
            force_exit()
        self.requested.set()
        name = signal.Signals(signum).name
        sys.stderr.write(f"\n{name}: stopping (press Ctrl-C again to force)\n")
        sys.stderr.flush()
        timer = threading.Timer(FORCE_AFTER_S, force_exit)
        timer.daemon = True
        timer.start()
        if self.interrupt:
            raise KeyboardInterrupt

    def install(self) -> None:
        """(Re)install the handlers: a library may have replaced them."""
        for sig in self.signals:
            previous = signal.signal(sig, self._handle)
            self._previous.setdefault(sig, previous)

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopSignals]:
        self.install()
        try:
            yield self
        finally:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)


_EXCEPTION_LINE = re.compile(
    r"^(?:\([\w:]+ pid=\d+(?:, ip=[\d.]+)?\)\s*)?"
    r"((?:[A-Za-z_]\w*\.)*[A-Z]\w*(?:Error|Exception|Exit|Interrupt)): (.+)$"
)
# vLLM's own wrappers around a failure reported above them.
_WRAPPERS = ("See root cause above", "Engine core initialization failed")


def root_cause(log_text: str) -> str | None:
    """The first exception of a log that is not a wrapper of an earlier one.

    A failed engine start logs the engine core's traceback (the cause), then
    the front end's "Engine core initialization failed. See root cause
    above"; Python prints the innermost cause of a chain first.
    """
    for line in log_text.splitlines():
        match = _EXCEPTION_LINE.match(line.strip())
        if match and not any(w in match.group(2) for w in _WRAPPERS):
            return f"{match.group(1)}: {match.group(2)}"
    return None


def read_tail(path: Path, limit: int = 1 << 20) -> str:
    """The last `limit` bytes of a log: where a process that served for hours
    wrote why it died (a failed start's whole log is far smaller)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - limit))
            return f.read().decode(errors="replace")
    except OSError:
        return ""
