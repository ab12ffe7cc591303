"""Online serving: our stack against vLLM's own server and FastChat's API server.

One Qwen v1 checkpoint (random weights), the same engine flags everywhere
(--enforce-eager, --max-model-len, float32, no prefix cache, the engine
pinned to core 0), the same seeded streams of chat requests (mixed prompt and
output lengths), at 1, 8 and 32 concurrent streaming clients, measured with
qwen_vllm's load generator. Systems are measured in turn, in a rotating
order each round, so machine noise hits all of them alike, each after a few
seconds of quiet and one uncounted request (see SETTLE_S):

  qwen-vllm  `qwen-vllm serve --num-workers 1`, through its OpenAI gateway
  vllm       `vllm serve` on the same checkpoint (the plugin makes it load)
  fastchat   FastChat's `fastchat.serve.openai_api_server` in front of the same
             controller and worker as qwen-vllm (several HTTP calls a request;
             run with a shim for its pydantic-1-only streaming, see below)

Goals: qwen-vllm >= 0.95x vllm's output tokens/s with <= 5 ms more median
TTFT, and clearly faster than fastchat.

    .venv/bin/python benchmarks/serving.py --quick   # smoke run, ~3 min
    .venv/bin/python benchmarks/serving.py           # full, ~10-15 min

Run the full one on a quiet machine. Writes
benchmarks/results/serving.{json,md,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qwen_vllm.loadgen.report import markdown_table, ms, plot_comparison, write_json
from qwen_vllm.loadgen.results import RequestResult, percentiles
from qwen_vllm.loadgen.runner import LoadGenerator
from qwen_vllm.loadgen.workload import LengthRange, LoadConfig

RESULTS = Path(__file__).resolve().parent / "results"
SYSTEMS = ("qwen-vllm", "vllm", "fastchat")
BASELINE = "vllm"
CONCURRENCY = (1, 8, 32)
MODEL_NAME = "qwen-v1-bench"
MAX_MODEL_LEN = 2048
# Sized for the 2-core build machine: a decode step of one stream takes about
# 20 ms on one core (mostly the 151936-token LM head), far above what the
# serving layers add, and a full run stays within about 15 minutes.
MODEL = {
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 2,
    "kv_channels": 128,
    "intermediate_size": 1408,
}
# Requests per concurrency level and round, prompt and output lengths.
FULL = {
    "rounds": 2,
    "requests": {1: 8, 8: 24, 32: 64},
    "prompt": "16-128",
    "output": "16-128",
}
QUICK = {
    "rounds": 1,
    "requests": {1: 3, 8: 8, 32: 32},
    "prompt": "16-96",
    "output": "16-48",
}
GOAL_THROUGHPUT_RATIO = 0.95
GOAL_TTFT_ADDED_MS = 5.0
# The engine of every system gets the same core (the other one runs the
# front ends and this load generator); one system is measured at a time.
ENGINE_CORE = "0"
ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "2",
    "VLLM_CPU_OMP_THREADS_BIND": ENGINE_CORE,
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
}


# FastChat 0.2.36 streams with pydantic v1's `.json(ensure_ascii=False)`, which
# pydantic 2 rejects (every stream dies after its first event). Its server runs
# with this call mapped to model_dump_json; its request flow is unchanged.
FASTCHAT_SHIM = """
import runpy
import pydantic

def _json(self, **kwargs):
    kwargs.pop("ensure_ascii", None)
    return self.model_dump_json(**kwargs)

pydantic.BaseModel.json = _json
runpy.run_module(
    "fastchat.serve.openai_api_server", run_name="__main__", alter_sys=True
)
"""


def status(text: str) -> None:
    sys.stderr.write("\r\033[K" + text if sys.stderr.isatty() else text + "\n")
    sys.stderr.flush()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def venv_bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def checkpoint(workdir: Path) -> Path:
    from qwen_vllm.checkpoints.demo import DemoModelSpec, ensure_demo_model

    spec = DemoModelSpec(**MODEL, dtype="float32", seq_length=MAX_MODEL_LEN, seed=1)
    return ensure_demo_model(workdir / MODEL_NAME, spec)


class Server:
    """A server process in its own process group, with its log in a file."""

    def __init__(self, name: str, cmd: list[str], health: str, log: Path) -> None:
        self.name, self.cmd, self.health, self.log = name, cmd, health, log
        self.proc: subprocess.Popen | None = None

    def start(self, cwd: Path, extra_env: dict[str, str] | None = None) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                self.cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **ENV, **(extra_env or {})},
                cwd=cwd,
                start_new_session=True,
            )

    def ready(self) -> bool:
        import httpx

        assert self.proc is not None
        if self.proc.poll() is not None:
            tail = self.log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{self.name} exited early; {self.log}:\n{tail}")
        try:
            with httpx.Client(timeout=2, trust_env=False) as client:
                return client.get(self.health).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def wait_ready(servers: list[Server], timeout: float) -> None:
    started = time.monotonic()
    pending = list(servers)
    shown = ""
    while pending:
        pending = [s for s in pending if not s.ready()]
        elapsed = time.monotonic() - started
        if pending and elapsed > timeout:
            names = ", ".join(s.name for s in pending)
            raise TimeoutError(f"not ready after {timeout:.0f} s: {names}")
        text = f"starting: waiting for {', '.join(s.name for s in pending)}"
        if pending and text != shown:
            status(text)
            shown = text
        time.sleep(1)


def wait_for_worker(controller: str, timeout: float) -> None:
    """The qwen-vllm gateway answers before its worker has loaded the model."""
    import httpx

    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2, trust_env=False) as client:
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError, ValueError):
                reply = client.post(f"{controller}/list_models")
                if MODEL_NAME in reply.json().get("models", []):
                    return
            time.sleep(1)
    raise TimeoutError("the qwen-vllm worker did not register")


@contextlib.contextmanager
def deployment(
    model: Path,
    workdir: Path,
    systems: list[str],
    ports: dict[str, int] | None = None,
    qwen_vllm_flags: tuple[str, ...] = (),
) -> Iterator[dict]:
    """Start every system; yield {system: OpenAI base URL}; stop them all.

    `ports` (filled in here) tells the caller where qwen-vllm's gateway,
    controller and worker listen; `qwen_vllm_flags` go to `qwen-vllm serve`."""
    logs = workdir / "logs"
    ports = {} if ports is None else ports
    for name in ("gateway", "controller", "worker", "vllm", "fastchat"):
        ports[name] = free_port()
    controller = f"http://127.0.0.1:{ports['controller']}"
    engine_flags = ["--enforce-eager", "--max-model-len", str(MAX_MODEL_LEN)]
    # qwen-vllm and fastchat share one engine and every system gets the same
    # prompts: a prefix cache would serve whoever comes second from memory.
    no_prefix_cache = {"enable_prefix_caching": False}
    servers: dict[str, Server] = {}
    if {"qwen-vllm", "fastchat"} & set(systems):
        servers["qwen-vllm"] = Server(
            "qwen-vllm",
            [
                venv_bin("qwen-vllm"),
                "serve",
                "--model",
                str(model),
                "--num-workers",
                "1",
                *engine_flags,
                "--engine-args",
                json.dumps(no_prefix_cache),
                "--port",
                str(ports["gateway"]),
                "--controller-port",
                str(ports["controller"]),
                "--worker-port",
                str(ports["worker"]),
                "--no-webui",
                "--log-level",
                "warning",
                # FastChat's API server and benchmarks/ttft_breakdown.py call
                # the controller and the worker, and send no internal token.
                "--insecure-no-internal-token",
                *qwen_vllm_flags,
            ],
            f"http://127.0.0.1:{ports['gateway']}/health",
            logs / "qwen-vllm.log",
        )
    if "vllm" in systems:
        servers["vllm"] = Server(
            "vllm",
            [
                venv_bin("vllm"),
                "serve",
                str(model),
                "--served-model-name",
                MODEL_NAME,
                "--host",
                "127.0.0.1",
                "--port",
                str(ports["vllm"]),
                *engine_flags,
                "--no-enable-prefix-caching",
                # vLLM's sampling defaults, as our worker uses, not the
                # checkpoint's generation_config.json.
                "--generation-config",
                "vllm",
                "--disable-log-stats",
                "--uvicorn-log-level",
                "warning",
            ],
            f"http://127.0.0.1:{ports['vllm']}/health",
            logs / "vllm.log",
        )
    try:
        for server in servers.values():
            server.start(workdir)
        wait_ready(list(servers.values()), timeout=900)
        if "qwen-vllm" in servers:
            wait_for_worker(controller, timeout=900)
        if "fastchat" in systems:
            fastchat = Server(
                "fastchat",
                [
                    sys.executable,
                    "-c",
                    FASTCHAT_SHIM,
                    "--controller-address",
                    controller,
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(ports["fastchat"]),
                ],
                f"http://127.0.0.1:{ports['fastchat']}/v1/models",
                logs / "fastchat.log",
            )
            servers["fastchat"] = fastchat
            # FastChat writes its own log files into the working directory.
            fastchat.start(logs, {"PYTHONPATH": ""})
            wait_ready([fastchat], timeout=120)
        urls = {
            "qwen-vllm": f"http://127.0.0.1:{ports['gateway']}/v1",
            "vllm": f"http://127.0.0.1:{ports['vllm']}/v1",
            "fastchat": f"http://127.0.0.1:{ports['fastchat']}/v1",
        }
        yield {name: urls[name] for name in systems}
    finally:
        status("stopping the servers ...")
        for server in reversed(list(servers.values())):
            server.stop()


def load_config(url: str, concurrency: int, requests: int, plan: dict, seed: int):
    return LoadConfig(
        base_url=url,
        model=MODEL_NAME,
        endpoint="chat",
        concurrency=concurrency,
        num_requests=requests,
        max_duration=600.0,
        prompt_tokens=LengthRange.parse(plan["prompt"]),
        output_tokens=LengthRange.parse(plan["output"]),
        seed=seed,
        temperature=0.0,
        request_timeout=600.0,
        stall_timeout=120.0,
        error_backoff=0.5,
    )


# The engines share core 0, and one that has just worked keeps its threads
# spinning for a while: a system measured right after another then sees up to
# a second more on its first requests (measured: ~0.8 s on every request when
# two servers are called alternately 0.3 s apart, none 2 s apart).
SETTLE_S = 3.0


def settle(url: str, plan: dict) -> None:
    """Let the previous system's engine go idle, then send the next one a
    request that is not counted (its connections and first-request paths)."""
    time.sleep(SETTLE_S)
    asyncio.run(LoadGenerator(load_config(url, 1, 1, plan, seed=20_000)).run())


def measure(urls: dict[str, str], plan: dict, concurrency: list[int]) -> list[dict]:
    """Every (round, concurrency, system) run, systems in a rotating order."""
    runs: list[dict] = []
    systems = list(urls)
    for name in systems:  # warm-up: allocator, caches, first-request paths
        status(f"warming up {name} ...")
        warm = load_config(urls[name], 4, 8, plan, seed=10_000)
        result = asyncio.run(LoadGenerator(warm).run())
        failed = [r.message for r in result.requests if not r.ok]
        if failed:
            raise RuntimeError(f"{name} fails requests: {failed[:3]}")
    step = 0
    for round_ in range(plan["rounds"]):
        for level in concurrency:
            order = systems[step % len(systems) :] + systems[: step % len(systems)]
            step += 1
            for name in order:
                requests = plan["requests"][level]
                status(
                    f"round {round_ + 1}/{plan['rounds']}: {name} at concurrency "
                    f"{level} ({requests} requests) ..."
                )
                settle(urls[name], plan)
                # The same seed for every system: the same requests.
                config = load_config(
                    urls[name], level, requests, plan, seed=round_ * 1000 + level
                )
                result = asyncio.run(LoadGenerator(config).run())
                runs.append(
                    {
                        "system": name,
                        "round": round_,
                        "concurrency": level,
                        "summary": result.summary(),
                        "requests": [r.to_dict() for r in result.requests],
                    }
                )
    return runs


def aggregate(runs: list[dict], systems: list[str], levels: list[int]) -> dict:
    """Pooled over rounds: tokens over summed run time, percentiles of all."""
    table: dict[str, dict[int, dict[str, Any]]] = {}
    for name in systems:
        table[name] = {}
        for level in levels:
            mine = [
                r for r in runs if r["system"] == name and r["concurrency"] == level
            ]
            requests = [
                RequestResult(**_fields(q)) for r in mine for q in r["requests"]
            ]
            ok = [q for q in requests if q.ok]
            duration = sum(r["summary"]["duration_s"] for r in mine)
            tokens = sum(q.output_tokens for q in ok)
            per_round = [
                r["summary"]["throughput"]["output_tokens_per_s"] for r in mine
            ]
            ttft = percentiles([q.ttft for q in ok if q.ttft is not None])
            tpot = percentiles([q.tpot for q in ok if q.tpot is not None])
            itl = percentiles([g for q in ok for g in q.itl])
            table[name][level] = {
                "requests": len(requests),
                "failed": len(requests) - len(ok),
                "output_tokens": tokens,
                "output_tokens_per_s": tokens / duration if duration else 0.0,
                "output_tokens_per_s_rounds": per_round,
                "requests_per_s": len(ok) / duration if duration else 0.0,
                "ttft_ms": _in_ms(ttft),
                "tpot_ms": _in_ms(tpot),
                "itl_ms": _in_ms(itl),
                "ttft_p50_ms": _in_ms(ttft)["p50"],
                "tpot_p50_ms": _in_ms(tpot)["p50"],
            }
    return table


def _fields(data: dict) -> dict:
    return {k: v for k, v in data.items() if k not in ("ttft", "tpot")}


def _in_ms(stats: dict) -> dict:
    return {k: None if v is None else v * 1000 for k, v in stats.items()}


def ratios(table: dict, levels: list[int], runs: list[dict]) -> dict:
    out: dict[str, dict[str, Any]] = {}
    if BASELINE not in table:
        return out
    for name in table:
        if name == BASELINE:
            continue
        for level in levels:
            mine, base = table[name][level], table[BASELINE][level]
            entry = {
                "throughput_ratio": _div(
                    mine["output_tokens_per_s"], base["output_tokens_per_s"]
                ),
                "ttft_p50_added_ms": _sub(mine["ttft_p50_ms"], base["ttft_p50_ms"]),
                "ttft_added_paired_ms": paired_ttft_added_ms(runs, name, level),
                "tpot_p50_ratio": _div(mine["tpot_p50_ms"], base["tpot_p50_ms"]),
            }
            out[f"{name}/{BASELINE}@{level}"] = entry
    return out


def paired_ttft_added_ms(runs: list[dict], name: str, level: int) -> float | None:
    """Median, over the requests both systems served, of the difference in
    TTFT of the same request (same round and index: same prompt and length).
    Prompts of mixed lengths make the difference of two medians noisy."""
    baseline = {
        (r["round"], q["index"]): q["ttft"]
        for r in runs
        if r["system"] == BASELINE and r["concurrency"] == level
        for q in r["requests"]
        if q.get("ttft") is not None
    }
    differences = [
        (q["ttft"] - baseline[(r["round"], q["index"])]) * 1000
        for r in runs
        if r["system"] == name and r["concurrency"] == level
        for q in r["requests"]
        if q.get("ttft") is not None and (r["round"], q["index"]) in baseline
    ]
    return statistics.median(differences) if differences else None


def _div(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _sub(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def goals(table: dict, levels: list[int], ratios: dict) -> list[dict]:
    checks = []
    if not {"qwen-vllm", BASELINE} <= set(table):
        return checks
    for level in levels:
        ours, base = table["qwen-vllm"][level], table[BASELINE][level]
        ratio = _div(ours["output_tokens_per_s"], base["output_tokens_per_s"])
        added = ratios[f"qwen-vllm/{BASELINE}@{level}"]["ttft_added_paired_ms"]
        checks.append(
            {
                "goal": f"throughput >= {GOAL_THROUGHPUT_RATIO}x vllm @{level}",
                "value": ratio,
                "met": ratio is not None and ratio >= GOAL_THROUGHPUT_RATIO,
            }
        )
        checks.append(
            {
                "goal": f"median TTFT added (paired) <= {GOAL_TTFT_ADDED_MS} ms"
                f" @{level}",
                "value": added,
                "met": added is not None and added <= GOAL_TTFT_ADDED_MS,
            }
        )
        if "fastchat" in table:
            theirs = table["fastchat"][level]["output_tokens_per_s"]
            checks.append(
                {
                    "goal": f"faster than fastchat @{level}",
                    "value": _div(ours["output_tokens_per_s"], theirs),
                    "met": ours["output_tokens_per_s"] > theirs,
                }
            )
    return checks


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "load_average_at_start": os.getloadavg(),
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError):
        total = Path("/proc/meminfo").read_text().split("\n")[0].split()[1]
        info["memory_gib"] = round(int(total) / 2**20, 1)
    with contextlib.suppress(Exception):
        from importlib.metadata import version

        info["vllm"] = version("vllm")
        info["fschat"] = version("fschat")
    return info


def markdown(result: dict) -> str:
    levels = result["concurrency"]
    model = result["model"]
    lines = [
        f"**{result['run']} run** — `{result['command']}`, {result['started_at']}",
        "",
        f"Model: Qwen v1 demo checkpoint, {model['num_hidden_layers']} layers, hidden "
        f"{model['hidden_size']}, float32, random weights; engine on one core "
        f"(--enforce-eager, --max-model-len {MAX_MODEL_LEN}, no prefix cache); chat "
        f"requests with "
        f"prompts of {result['plan']['prompt']} words and {result['plan']['output']} "
        f"output tokens; {result['plan']['rounds']} interleaved round(s).",
        "",
    ]
    rows = []
    for name, by_level in result["table"].items():
        for level in levels:
            row = by_level[level]
            key = f"{name}/{BASELINE}@{level}"
            ratio = result["ratios"].get(key, {})
            rows.append(
                [
                    name,
                    level,
                    f"{row['requests'] - row['failed']}/{row['requests']}",
                    f"{row['output_tokens_per_s']:.1f}",
                    _fmt(ratio.get("throughput_ratio"), "{:.3f}x", "1 (baseline)")
                    if name != BASELINE
                    else "1 (baseline)",
                    f"{ms(_s(row['ttft_ms']['p50']))} / {ms(_s(row['ttft_ms']['p90']))}"
                    f" / {ms(_s(row['ttft_ms']['p99']))}",
                    _fmt(ratio.get("ttft_p50_added_ms"), "{:+.1f}", "-")
                    + " / "
                    + _fmt(ratio.get("ttft_added_paired_ms"), "{:+.1f}", "-"),
                    f"{ms(_s(row['tpot_ms']['p50']))} / {ms(_s(row['tpot_ms']['p90']))}"
                    f" / {ms(_s(row['tpot_ms']['p99']))}",
                    f"{ms(_s(row['itl_ms']['p50']))} / {ms(_s(row['itl_ms']['p99']))}",
                ]
            )
    lines.append(
        markdown_table(
            [
                "system",
                "streams",
                "ok",
                "output tok/s",
                "vs vllm",
                "TTFT p50/p90/p99 ms",
                "TTFT added ms: p50s / paired",
                "TPOT p50/p90/p99 ms",
                "ITL p50/p99 ms",
            ],
            rows,
        )
    )
    if result["goals"]:
        lines.append(
            markdown_table(
                ["goal", "value", "met"],
                [
                    [
                        g["goal"],
                        _fmt(g["value"], "{:.3f}", "-"),
                        "yes" if g["met"] else "NO",
                    ]
                    for g in result["goals"]
                ],
            )
        )
    return "\n".join(lines)


def _s(value_ms: float | None) -> float | None:
    return None if value_ms is None else value_ms / 1000


def _fmt(value: float | None, pattern: str, missing: str) -> str:
    return missing if value is None else pattern.format(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (~3 min)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help="comma-separated subset of " + ", ".join(SYSTEMS),
    )
    parser.add_argument(
        "--concurrency",
        default=",".join(map(str, CONCURRENCY)),
        help="comma-separated stream counts (default %(default)s)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path.home() / ".cache" / "qwen_vllm" / "bench" / "serving",
        help="checkpoint and server logs",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "serving")
    parser.add_argument(
        "--report",
        type=Path,
        metavar="JSON",
        help="measure nothing: recompute the ratios and goals of an earlier "
        "run's JSON and rewrite it and its .md and .png",
    )
    args = parser.parse_args()
    if args.report:
        if not args.report.is_file():
            parser.error(f"--report {args.report}: no such file")
        result = json.loads(args.report.read_text())
        result["table"] = {
            name: {int(level): row for level, row in rows.items()}
            for name, rows in result["table"].items()
        }
        write_report(result, args.report.with_suffix(""))
        return
    plan = dict(QUICK if args.quick else FULL)
    if args.rounds:
        plan["rounds"] = args.rounds
    systems = [s for s in args.systems.split(",") if s]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown systems: {', '.join(sorted(unknown))}")
    levels = [int(c) for c in args.concurrency.split(",")]
    for level in levels:
        plan["requests"].setdefault(level, max(4, 3 * level))

    command = "benchmarks/serving.py " + " ".join(sys.argv[1:])
    started_at = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    info = machine()
    began = time.monotonic()
    status("writing the checkpoint ...")
    model_dir = checkpoint(args.workdir)
    with deployment(model_dir, args.workdir, systems) as urls:
        runs = measure(urls, plan, levels)
    table = aggregate(runs, systems, levels)
    result = {
        "run": "quick" if args.quick else "full",
        "command": command.strip(),
        "started_at": started_at,
        "wall_time_s": round(time.monotonic() - began, 1),
        "machine": info,
        "model": {**MODEL, "dtype": "float32", "max_model_len": MAX_MODEL_LEN},
        "plan": plan,
        "concurrency": levels,
        "systems": systems,
        "table": table,
        "runs": runs,
    }
    write_report(result, args.out)
    print(f"wall time: {result['wall_time_s']:.0f} s")


def write_report(result: dict, out: Path) -> None:
    """Ratios and goals from the measured runs; the JSON, .md and .png."""
    levels, table = result["concurrency"], result["table"]
    result["ratios"] = ratios(table, levels, result["runs"])
    result["goals"] = goals(table, levels, result["ratios"])
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out.with_suffix(".json"), result)
    text = markdown(result)
    out.with_suffix(".md").write_text(text + "\n")
    plot_comparison(
        result["systems"],
        levels,
        table,
        out.with_suffix(".png"),
        title=f"Serving, {result['run']} run: 1-core CPU engine, chat streams",
    )
    status("")
    print(text)
    print(f"results: {out.with_suffix('.json')} (.md, .png)")


if __name__ == "__main__":
    main()
