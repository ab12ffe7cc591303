"""What a load run measured: per-request results, progress, process samples,
and their summary statistics (percentiles, throughput, errors by kind)."""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from qwen_vllm.loadgen.workload import LoadConfig

# Failure kinds that end a request promptly with a diagnosis: an HTTP error, an
# error event in the stream, a refused or dropped connection. A timeout means
# the server went silent: in a fault-injection run that is a hang.
CLEAN_FAILURES = frozenset({"http", "error_event", "connect", "disconnected"})
HUNG = "timeout"


@dataclass
class RequestResult:
    """One request; times are seconds since the start of the run."""

    index: int
    start: float
    end: float = 0.0
    ok: bool = False
    kind: str | None = None  # failure kind, see CLEAN_FAILURES and HUNG
    message: str | None = None
    status: int | None = None
    first_token: float | None = None
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int | None = None
    max_tokens: int = 0
    finish_reason: str | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.start

    @property
    def tpot(self) -> float | None:
        if self.first_token is None or self.output_tokens < 2:
            return None
        last = self.first_token + sum(self.itl)
        return (last - self.first_token) / (self.output_tokens - 1)

    @property
    def latency(self) -> float:
        return self.end - self.start

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ttft"] = self.ttft
        data["tpot"] = self.tpot
        return data


@dataclass
class Progress:
    done: int
    failed: int
    in_flight: int
    output_tokens: int
    elapsed: float
    ttft_p50: float | None

    def line(self, total: int | None) -> str:
        """total None: a time-bound run (soak), whose count is no goal."""
        rate = self.output_tokens / self.elapsed if self.elapsed > 0 else 0.0
        ttft = "-" if self.ttft_p50 is None else f"{self.ttft_p50 * 1000:.0f} ms"
        done = f"{self.done}" if total is None else f"{self.done}/{total}"
        return (
            f"{done} done, {self.in_flight} in flight, "
            f"{self.failed} failed, {rate:.1f} tok/s, TTFT p50 {ttft}, "
            f"{self.elapsed:.0f} s"
        )


@dataclass
class WatchSample:
    t: float
    label: str
    pid: int | None
    rss_bytes: int | None
    open_fds: int | None


@dataclass
class RunResult:
    config: LoadConfig
    started_at: str
    duration: float
    requests: list[RequestResult]
    samples: list[WatchSample] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        summary = summarize(self.requests, self.duration)
        if self.samples:
            summary["processes"] = summarize_samples(self.samples)
        return summary

    def to_dict(self, *, include_requests: bool = True) -> dict[str, Any]:
        data: dict[str, Any] = {
            "config": self.config.to_dict(),
            "started_at": self.started_at,
            "duration_s": self.duration,
            "summary": self.summary(),
        }
        if include_requests:
            data["requests"] = [r.to_dict() for r in self.requests]
        if self.samples:
            data["samples"] = [asdict(s) for s in self.samples]
        return data


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    """p50/p90/p99 (linear interpolation, as numpy's default), mean and max."""
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None, "max": None}
    if len(values) == 1:  # quantiles wants two points (before Python 3.13)
        p50 = p90 = p99 = values[0]
    else:
        cuts = statistics.quantiles(values, n=100, method="inclusive")
        p50, p90, p99 = cuts[49], cuts[89], cuts[98]
    return {
        "p50": p50,
        "p90": p90,
        "p99": p99,
        "mean": statistics.fmean(values),
        "max": max(values),
    }


def summarize(results: Sequence[RequestResult], duration: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    tokens = sum(r.output_tokens for r in ok)
    errors = Counter(r.kind or "unknown" for r in results if not r.ok)
    return {
        "requests": {
            "sent": len(results),
            "succeeded": len(ok),
            "failed": len(results) - len(ok),
        },
        "duration_s": duration,
        "throughput": {
            "output_tokens": tokens,
            "output_tokens_per_s": tokens / duration if duration > 0 else 0.0,
            "requests_per_s": len(ok) / duration if duration > 0 else 0.0,
        },
        "ttft_s": percentiles([r.ttft for r in ok if r.ttft is not None]),
        "tpot_s": percentiles([r.tpot for r in ok if r.tpot is not None]),
        "itl_s": percentiles([gap for r in ok for gap in r.itl]),
        "latency_s": percentiles([r.latency for r in ok]),
        "errors": dict(sorted(errors.items())),
    }


def summarize_samples(samples: Sequence[WatchSample]) -> dict[str, Any]:
    """Per watched process: first, last and largest RSS and descriptor count."""
    out: dict[str, Any] = {}
    for label in dict.fromkeys(s.label for s in samples):
        seen = [s for s in samples if s.label == label and s.pid is not None]
        if not seen:
            out[label] = {"pids": [], "samples": 0}
            continue
        rss = [s.rss_bytes for s in seen if s.rss_bytes is not None]
        fds = [s.open_fds for s in seen if s.open_fds is not None]
        out[label] = {
            "pids": list(dict.fromkeys(s.pid for s in seen)),
            "samples": len(seen),
            "rss_mib": _start_end_max([b / 2**20 for b in rss]),
            "open_fds": _start_end_max(fds),
        }
    return out


def _start_end_max(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"start": None, "end": None, "max": None}
    return {"start": values[0], "end": values[-1], "max": max(values)}
