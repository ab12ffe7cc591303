"""`qwen-vllm bench`: load-test any OpenAI-compatible streaming API.

Wired into the command line through add_bench_parser; everything heavy is
imported when the command runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

from qwen_vllm.cli.errors import CliError

DEFAULT_URL = "http://127.0.0.1:8000/v1"
# Soak runs are bounded by time; this only keeps the count bounded too.
SOAK_MAX_REQUESTS = 10_000_000


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="load-test an OpenAI-compatible API (throughput, TTFT, TPOT, soak)",
        description="Stream chat or completion requests at a fixed concurrency "
        "and report output tokens/s, time to first token, time per output token "
        "and inter-token latency percentiles, and errors by kind. With --soak, "
        "run for a duration and sample the memory and open file descriptors of "
        "--watch'ed processes. Writes a JSON file and a PNG plot.",
    )
    p.add_argument("--url", default=DEFAULT_URL, help="API root (default %(default)s)")
    p.add_argument("--model", default=None, help="model (default: the first listed)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("OPENAI_API_KEY"),
        help="Bearer key (default: $OPENAI_API_KEY)",
    )
    p.add_argument("--endpoint", choices=("chat", "completions"), default="chat")
    p.add_argument("--concurrency", type=int, default=8, help="parallel streams")
    p.add_argument("--num-requests", type=int, default=None, help="default 100")
    p.add_argument(
        "--max-duration",
        type=float,
        default=600.0,
        help="no request starts after this many seconds (default %(default)s)",
    )
    p.add_argument(
        "--prompt-tokens",
        default="16-256",
        metavar="N|LOW-HIGH",
        help="prompt lengths, drawn log-uniformly (default %(default)s)",
    )
    p.add_argument(
        "--output-tokens",
        default="16-128",
        metavar="N|LOW-HIGH",
        help="max_tokens per request, drawn log-uniformly (default %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="request sequence seed")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument(
        "--stall-timeout",
        type=float,
        default=60.0,
        help="longest silence inside a stream before it counts as hung",
    )
    p.add_argument(
        "--extra-body",
        type=json.loads,
        default={},
        metavar="JSON",
        help="fields merged into every request body",
    )
    p.add_argument(
        "--soak",
        type=float,
        default=None,
        metavar="SECONDS",
        help="soak mode: run this long (request count unbounded unless given)",
    )
    p.add_argument(
        "--watch",
        action="append",
        default=[],
        metavar="PID|port:N|URL",
        help="process to sample in soak mode: a PID, the process listening on a "
        "port, or a qwen-vllm worker URL (its /health pid); repeatable",
    )
    p.add_argument("--sample-interval", type=float, default=5.0)
    p.add_argument(
        "--output",
        type=Path,
        default=Path("bench-results.json"),
        help="JSON results (default %(default)s); the plot goes beside it (.png)",
    )
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    p.set_defaults(run=run_bench)


def _config(args: argparse.Namespace, model: str):
    from qwen_vllm.loadgen.workload import LengthRange, LoadConfig

    num_requests = args.num_requests
    max_duration = args.max_duration
    if args.soak is not None:
        max_duration = args.soak
        num_requests = num_requests or SOAK_MAX_REQUESTS
    return LoadConfig(
        base_url=args.url,
        model=model,
        api_key=args.api_key,
        endpoint=args.endpoint,
        concurrency=args.concurrency,
        num_requests=num_requests or 100,
        max_duration=max_duration,
        prompt_tokens=LengthRange.parse(args.prompt_tokens),
        output_tokens=LengthRange.parse(args.output_tokens),
        seed=args.seed,
        temperature=args.temperature,
        request_timeout=args.request_timeout,
        stall_timeout=args.stall_timeout,
        extra_body=args.extra_body,
    )


class StatusLine:
    """One live line on a terminal; a line every few seconds otherwise."""

    def __init__(self, total: int | None, every: float = 10.0) -> None:
        self.total = total
        self.tty = sys.stderr.isatty()
        self.every = every
        self.last = 0.0

    def __call__(self, progress) -> None:
        text = "bench: " + progress.line(self.total)
        if self.tty:
            sys.stderr.write("\r\033[K" + text)
        elif time.monotonic() - self.last >= self.every:
            sys.stderr.write(text + "\n")
            self.last = time.monotonic()
        sys.stderr.flush()

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


def run_bench(args: argparse.Namespace) -> None:
    from qwen_vllm.loadgen import report, runner
    from qwen_vllm.loadgen.procs import pid_source

    if args.concurrency < 1:
        raise CliError("--concurrency must be at least 1")
    try:
        model = args.model or asyncio.run(runner.discover_model(args.url, args.api_key))
    except Exception as exc:
        raise CliError(f"cannot list the models at {args.url}: {exc}") from exc
    try:
        config = _config(args, model)
        watch = dict(pid_source(spec) for spec in args.watch)
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    generator = runner.LoadGenerator(
        config, watch=watch, sample_interval=args.sample_interval
    )
    soak_only = args.soak is not None and args.num_requests is None
    status = StatusLine(None if soak_only else config.num_requests)
    print(
        f"bench: {config.endpoint} on {config.base_url} (model {model!r}), "
        f"concurrency {config.concurrency}, "
        + ("" if soak_only else f"up to {config.num_requests} requests or ")
        + f"{config.max_duration:.0f} s",
        file=sys.stderr,
    )
    try:
        run = asyncio.run(generator.run(on_progress=status))
    finally:
        status.close()
    print(report.summary_text(run.summary()))
    path = report.write_json(args.output, run.to_dict())
    print(f"results: {path}")
    if not args.no_plot:
        try:
            plot = report.plot_run(run, path.with_suffix(".png"), title=config.base_url)
        except ImportError:
            print("plot skipped: matplotlib is not installed", file=sys.stderr)
        else:
            print(f"plot: {plot}")
    if run.requests and not any(r.ok for r in run.requests):
        raise CliError("every request failed")
