"""LoRA adapters under mixed traffic: what serving many fine-tunes costs.

Two deployments of the serving benchmark's checkpoint and engine flags, each
with the same memory for weights and KV caches (KV_CACHE_GIB, the engines on
the same core), one after the other (both at once do not fit in memory):

  adapters  `qwen-vllm serve --lora ...`: one engine with 16 PEFT adapters
            (rank 8 on Qwen's target modules c_attn, c_proj, w1, w2, made
            with peft)
  merged    one controller and gateway, and one `qwen-vllm worker` per model:
            the base and 4 fine-tunes merged by `qwen-vllm merge-lora`; five
            copies of the weights, so each engine gets what is left of the
            same memory for its KV cache. Its base engine runs without LoRA.

Each mode streams REQUESTS chat requests at CONCURRENCY concurrent clients,
a deployment's modes in a rotating order each round:

  adapters: base          every request for the base model (the baseline)
  adapters: 1, 4, 16      round-robin over the base and that many adapters,
                          so every batch mixes them
  merged: base            the base model on its engine without LoRA (a KV
                          cache smaller than the adapters' engine, but more
                          than these requests use)
  merged: 4               the same requests as adapters: 4, each fine-tune on
                          its own engine

and reports output tokens/s, median and p90 time to first token, and each
mode's ratio to `adapters: base` (measured in the same rounds for the
adapters' modes, minutes apart for the merged ones). Goal: 4
adapters at >= 0.8x base-only throughput.

    .venv/bin/python benchmarks/lora.py              # 2 rounds, ~20 min
    .venv/bin/python benchmarks/lora.py --rounds 1

Writes benchmarks/results/lora.{json,md,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serving import (  # noqa: E402  (the serving benchmark's deployment)
    MAX_MODEL_LEN,
    MODEL_NAME,
    RESULTS,
    Server,
    checkpoint,
    deployment,
    free_port,
    machine,
    status,
    venv_bin,
    wait_ready,
)
from streams import (  # noqa: E402
    CONCURRENCY,
    MAX_TOKENS,
    REQUESTS,
    rotations,
    run_mode,
    summary,
)

from qwen_vllm.loadgen.report import write_json  # noqa: E402
from tests.lora_adapters import AdapterSpec, write_adapter  # noqa: E402

ADAPTERS = 16
MERGED = 4  # fine-tunes served as merged copies, one worker each
MODES = (
    ("adapters", "base"),
    ("adapters", "1"),
    ("adapters", "4"),
    ("adapters", "16"),
    ("merged", "base"),
    ("merged", str(MERGED)),
)
BASELINE = ("adapters", "base")
KV_CACHE_GIB = 2.0  # of every deployment: its engines' KV caches and weights
GOAL_THROUGHPUT_RATIO = 0.8
GOAL_MODE = ("adapters", "4")
LABELS = {
    ("adapters", "base"): "one engine, 16 adapters loaded: base only",
    ("adapters", "1"): "one engine: base + 1 adapter",
    ("adapters", "4"): "one engine: base + 4 adapters",
    ("adapters", "16"): "one engine: base + 16 adapters",
    ("merged", "base"): "one engine, LoRA off: base only",
    ("merged", str(MERGED)): f"{MERGED + 1} engines (base + {MERGED} merged copies)",
}
ENGINE_FLAGS = (
    *("--enforce-eager", "--max-model-len", str(MAX_MODEL_LEN)),
    *("--engine-args", json.dumps({"enable_prefix_caching": False})),
)


def adapter_name(i: int) -> str:
    return f"ft{i:02d}"


def model_for(mix: str, i: int) -> str:
    """Request i's model: the base, or round-robin over base and fine-tunes."""
    if mix == "base":
        return MODEL_NAME
    names = [MODEL_NAME, *(adapter_name(k) for k in range(int(mix)))]
    return names[i % len(names)]


def key(mode: tuple[str, str]) -> str:
    return ": ".join(mode)


def request_for(mode: tuple[str, str]):
    def request(i: int, seed: int) -> dict[str, Any]:
        return {
            "model": model_for(mode[1], i),
            "messages": [{"role": "user", "content": f"Tell me a story ({seed})."}],
            "seed": seed,
        }

    return request


def measure(url: str, mode: tuple[str, str], round_number: int) -> dict[str, Any]:
    return asyncio.run(run_mode(url, key(mode), round_number, request_for(mode)))


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| deployment: requests | output tok/s | x baseline | median TTFT ms | +ms "
        "| p90 TTFT ms |",
        "|---|---|---|---|---|---|",
    ]
    for mode in MODES:
        row = result["table"][key(mode)]
        lines.append(
            f"| {LABELS[mode]} | {row['output_tokens_per_s']:.0f} | "
            f"{row['throughput_ratio']:.2f} | {row['ttft_median_ms']:.0f} | "
            f"{row['ttft_added_ms']:+.0f} | {row['ttft_p90_ms']:.0f} |"
        )
    table = result["table"]
    ratio = table[key(GOAL_MODE)]["throughput_ratio"]
    met = "met" if ratio >= GOAL_THROUGHPUT_RATIO else "missed"
    lora_off = table[key(("merged", "base"))]["output_tokens_per_s"]
    merged = table[key(("merged", str(MERGED)))]["output_tokens_per_s"]
    four = table[key(GOAL_MODE)]["output_tokens_per_s"]
    memory = result["memory_gib"]
    lines += [
        "",
        f"Baseline: {LABELS[BASELINE]}. Goal: {GOAL_MODE[1]} adapters >= "
        f"{GOAL_THROUGHPUT_RATIO}x base-only throughput on the same engine: {met} "
        f"({ratio:.2f}x). The base model with LoRA on and 16 adapters loaded runs "
        f"at {table[key(BASELINE)]['output_tokens_per_s'] / lora_off:.2f}x its "
        f"speed with LoRA off ({lora_off:.0f} tok/s); base + {MERGED} adapters on "
        f"one engine give {four / merged:.2f}x the throughput of {MERGED + 1} "
        f"engines with merged copies in the same memory ({memory['kv_cache_gib']} "
        f"GiB per deployment: merged engines hold {memory['merged_kv_cache_gib']:.2f} "
        f"GiB of KV cache each beside their {memory['weights_gib']:.2f} GiB of "
        f"weights). {result['rounds']} rounds x {REQUESTS} requests per mode, "
        f"concurrency {CONCURRENCY}, at most {MAX_TOKENS} tokens each.",
    ]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [LABELS[mode].replace(": ", ":\n") for mode in MODES]
    rows = [result["table"][key(mode)] for mode in MODES]
    figure, (left, right) = plt.subplots(2, 1, figsize=(10, 8))
    left.barh(labels, [row["throughput_ratio"] for row in rows])
    left.axvline(GOAL_THROUGHPUT_RATIO, color="red", linestyle="--", label="goal")
    left.set_title("output tokens/s, x base-only with 16 adapters loaded")
    left.legend()
    left.invert_yaxis()
    right.barh(labels, [row["ttft_median_ms"] for row in rows])
    right.set_title("median time to first token (ms)")
    right.invert_yaxis()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def weights_gib(model: Path) -> float:
    return sum(f.stat().st_size for f in model.glob("*.safetensors")) / 2**30


@contextlib.contextmanager
def merged_deployment(
    models: dict[str, Path], workdir: Path, kv_cache_gib: float
) -> Iterator[str]:
    """A controller, a gateway and one worker per model; yields the gateway's
    OpenAI base URL."""
    logs = workdir / "logs"
    controller_port, gateway_port = free_port(), free_port()
    common = [
        *("--host", "127.0.0.1", "--controller-port", str(controller_port)),
        *("--insecure-no-internal-token", "--log-level", "warning"),
    ]
    qwen_vllm = venv_bin("qwen-vllm")
    servers = [
        Server(
            "controller",
            [qwen_vllm, "controller", *common],
            f"http://127.0.0.1:{controller_port}/health",
            logs / "merged-controller.log",
        )
    ]
    for name, model in models.items():
        port = free_port()
        servers.append(
            Server(
                f"worker {name}",
                [
                    *(qwen_vllm, "worker", *common, "--model", str(model)),
                    *("--model-name", name, "--worker-port", str(port)),
                    *("--kv-cache-memory", f"{kv_cache_gib:.3f}", *ENGINE_FLAGS),
                ],
                f"http://127.0.0.1:{port}/health",
                logs / f"merged-{name}.log",
            )
        )
    servers.append(
        Server(
            "gateway",
            [qwen_vllm, "gateway", *common, "--port", str(gateway_port)],
            f"http://127.0.0.1:{gateway_port}/health",
            logs / "merged-gateway.log",
        )
    )
    try:
        for server in servers:
            server.start(workdir)
        wait_ready(servers, timeout=1200)
        wait_listed(f"http://127.0.0.1:{gateway_port}/v1", set(models), 300)
        yield f"http://127.0.0.1:{gateway_port}/v1"
    finally:
        for server in reversed(servers):
            server.stop()


def wait_listed(url: str, names: set[str], timeout: float) -> None:
    """Until the gateway lists every model (workers register after /health)."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
            listed = httpx.get(f"{url}/models", timeout=5).json()["data"]
            if names <= {m["id"] for m in listed}:
                return
        time.sleep(1)
    raise TimeoutError(f"not listed after {timeout:.0f} s: {sorted(names)}")


def main() -> None:
    from qwen_vllm.cli.commands import main as qwen_vllm_main

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--workdir",
        type=Path,
        help="keep checkpoints and logs here (default: a temporary directory)",
    )
    args = parser.parse_args()
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        model = checkpoint(workdir)
        status(f"writing {ADAPTERS} adapters ...")
        paths = {
            adapter_name(i): write_adapter(
                model, workdir / adapter_name(i), AdapterSpec(rank=8, alpha=16, seed=i)
            )
            for i in range(ADAPTERS)
        }
        merged = {MODEL_NAME: model}
        for name in list(paths)[:MERGED]:
            status(f"merging {name} ...")
            merged[name] = workdir / f"merged-{name}"
            argv = ["merge-lora", str(model), str(paths[name]), str(merged[name])]
            assert qwen_vllm_main(argv) == 0
        weights = weights_gib(model)
        # Same memory: one copy of the weights and the KV cache, or five
        # copies and what is left of it split five ways.
        merged_kv = (KV_CACHE_GIB - MERGED * weights) / (MERGED + 1)
        memory = {
            "kv_cache_gib": KV_CACHE_GIB,
            "weights_gib": weights,
            "merged_kv_cache_gib": merged_kv,
        }
        info = machine()
        lora = ",".join(f"{name}={path}" for name, path in paths.items())
        kv = ("--kv-cache-memory", str(KV_CACHE_GIB))
        for name in ("adapters", "merged"):
            (workdir / name).mkdir(exist_ok=True)
        # One deployment at a time: six vLLM engines at once do not fit in
        # this machine's memory (each engine process carries about 2.5 GiB
        # of runtime on CPU besides its weights and KV cache).
        deployments = {
            "adapters": lambda: deployment(
                model,
                workdir / "adapters",
                ["qwen-vllm"],
                qwen_vllm_flags=("--lora", lora, *kv),
            ),
            "merged": lambda: merged_deployment(merged, workdir / "merged", merged_kv),
        }
        for name, start in deployments.items():
            modes = tuple(mode for mode in MODES if mode[0] == name)
            with start() as urls:
                url = urls if isinstance(urls, str) else urls["qwen-vllm"]
                for mode in modes:  # warm-up: every model loaded once, not counted
                    measure(url, mode, -1)
                for number, mode in rotations(modes, args.rounds):
                    status(f"round {number + 1}/{args.rounds}: {key(mode)}")
                    runs.append(measure(url, mode, number))
    result = {
        "command": "benchmarks/lora.py --rounds " + str(args.rounds),
        "rounds": args.rounds,
        "machine": info,
        "memory_gib": memory,
        "table": summary(runs, [key(mode) for mode in MODES], key(BASELINE)),
        "runs": runs,
    }
    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / "lora.json", result)
    (RESULTS / "lora.md").write_text(markdown(result))
    plot(result, RESULTS / "lora.png")
    print(markdown(result))


if __name__ == "__main__":
    main()
