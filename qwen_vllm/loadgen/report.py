"""Load-test results as JSON, markdown tables and PNG plots.

matplotlib is imported only when a plot is drawn (it is a benchmark-time
dependency, not one of the services').
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qwen_vllm.loadgen.results import RunResult, percentiles


def write_json(path: str | Path, data: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return path


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|")

    lines = [
        "| " + " | ".join(cell(h) for h in header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def summary_text(summary: dict[str, Any]) -> str:
    """A few human lines for the end of a run."""
    req, tput = summary["requests"], summary["throughput"]
    lines = [
        f"requests: {req['sent']} sent, {req['succeeded']} succeeded, "
        f"{req['failed']} failed in {summary['duration_s']:.1f} s",
        f"throughput: {tput['output_tokens_per_s']:.1f} output tok/s, "
        f"{tput['requests_per_s']:.2f} req/s ({tput['output_tokens']} tokens)",
    ]
    for name in ("ttft_s", "tpot_s", "itl_s"):
        stats = summary[name]
        lines.append(
            f"{name[:-2].upper():5} ms: p50 {ms(stats['p50'])}  p90 "
            f"{ms(stats['p90'])}  p99 {ms(stats['p99'])}"
        )
    if summary["errors"]:
        kinds = ", ".join(f"{k}: {n}" for k, n in summary["errors"].items())
        lines.append(f"errors: {kinds}")
    for label, proc in summary.get("processes", {}).items():
        if not proc["samples"]:
            lines.append(f"{label}: no process found")
            continue
        rss, fds = proc["rss_mib"], proc["open_fds"]
        lines.append(
            f"{label} (pid {', '.join(map(str, proc['pids']))}): RSS "
            f"{rss['start']:.0f} -> {rss['end']:.0f} MiB (max {rss['max']:.0f}), "
            f"fds {fds['start']} -> {fds['end']} (max {fds['max']})"
        )
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def plot_run(run: RunResult, path: str | Path, title: str = "") -> Path:
    """Request timeline, TTFT and inter-token latency distributions, and (soak)
    memory and descriptors of the watched processes."""
    plt = _pyplot()
    soak = bool(run.samples)
    rows = 3 if soak else 2
    fig, axes = plt.subplots(rows, 2, figsize=(12, 4 * rows), squeeze=False)
    ok = [r for r in run.requests if r.ok]
    failed = [r for r in run.requests if not r.ok]

    ax = axes[0][0]
    ax.scatter(
        [r.start for r in ok],
        [r.latency for r in ok],
        s=6,
        label="succeeded",
    )
    if failed:
        ax.scatter(
            [r.start for r in failed],
            [r.latency for r in failed],
            s=14,
            marker="x",
            color="red",
            label="failed",
        )
    ax.set(xlabel="request start (s)", ylabel="latency (s)", title="Requests")
    ax.legend(loc="upper right")

    ax = axes[0][1]
    ttfts = sorted(r.ttft * 1000 for r in ok if r.ttft is not None)
    if ttfts:
        ax.plot(ttfts, [(i + 1) / len(ttfts) for i in range(len(ttfts))])
    ax.set(xlabel="TTFT (ms)", ylabel="fraction of requests", title="TTFT CDF")

    ax = axes[1][0]
    gaps = _up_to_p99([gap * 1000 for r in ok for gap in r.itl])
    if gaps:
        ax.hist(gaps, bins=60)
    ax.set(xlabel="inter-token latency (ms)", ylabel="count", title="ITL (to p99)")

    ax = axes[1][1]
    per_request = [
        (r.output_tokens - 1) / (r.end - r.first_token)
        for r in ok
        if r.first_token is not None and r.output_tokens > 1 and r.end > r.first_token
    ]
    per_request = _up_to_p99(per_request)
    if per_request:
        ax.hist(per_request, bins=40)
    ax.set(
        xlabel="tokens/s of one stream",
        ylabel="count",
        title="Stream speed (to p99)",
    )

    if soak:
        labels = list(dict.fromkeys(s.label for s in run.samples))
        for label in labels:
            points = [s for s in run.samples if s.label == label and s.pid]
            axes[2][0].plot(
                [s.t for s in points],
                [s.rss_bytes / 2**20 for s in points],
                label=label,
            )
            axes[2][1].plot(
                [s.t for s in points], [s.open_fds for s in points], label=label
            )
        axes[2][0].set(xlabel="time (s)", ylabel="RSS (MiB)", title="Memory")
        axes[2][1].set(xlabel="time (s)", ylabel="open fds", title="Descriptors")
        axes[2][0].legend(fontsize="small")
        axes[2][1].legend(fontsize="small")

    summary = run.summary()
    fig.suptitle(
        (title + "\n" if title else "")
        + f"{summary['throughput']['output_tokens_per_s']:.1f} tok/s, "
        f"{summary['requests']['succeeded']}/{summary['requests']['sent']} ok, "
        f"concurrency {run.config.concurrency}"
    )
    fig.tight_layout()
    return _save(fig, plt, path)


def plot_comparison(
    systems: Sequence[str],
    concurrencies: Sequence[int],
    metrics: dict[str, dict[int, dict[str, float | None]]],
    path: str | Path,
    title: str,
) -> Path:
    """Bars per concurrency level: throughput, median TTFT and median TPOT.

    metrics[system][concurrency] holds output_tokens_per_s, ttft_p50_ms and
    tpot_p50_ms.
    """
    plt = _pyplot()
    panels = [
        ("output_tokens_per_s", "output tokens/s (higher is better)"),
        ("ttft_p50_ms", "median TTFT, ms (lower is better)"),
        ("tpot_p50_ms", "median TPOT, ms (lower is better)"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2))
    width = 0.8 / max(1, len(systems))
    for ax, (key, label) in zip(axes, panels, strict=True):
        for i, system in enumerate(systems):
            values = [metrics[system].get(c, {}).get(key) or 0 for c in concurrencies]
            positions = [
                x + (i - (len(systems) - 1) / 2) * width
                for x in range(len(concurrencies))
            ]
            ax.bar(positions, values, width, label=system)
        ax.set_xticks(range(len(concurrencies)), [str(c) for c in concurrencies])
        ax.set(xlabel="concurrent streams", title=label)
    axes[0].legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, plt, path)


def _up_to_p99(values: list[float]) -> list[float]:
    """Values without the top percent: a few bursts would squash the scale."""
    if len(values) < 100:
        return values
    limit = percentiles(values)["p99"]
    return [v for v in values if v <= limit]


def _save(fig, plt, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
