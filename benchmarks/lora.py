"""LoRA adapters under mixed traffic: what serving many fine-tunes costs.

One `qwen-vllm serve --lora ...` deployment (the serving benchmark's
checkpoint and engine flags) with 16 PEFT adapters (rank 8 on Qwen's target
modules c_attn, c_proj, w1, w2, made with peft) streams REQUESTS chat requests
at CONCURRENCY concurrent clients per mode, modes in a rotating order each
round:

  base         every request for the base model (the baseline, same engine)
  1, 4, 16     requests spread round-robin over the base and that many
               adapters, so every batch mixes them

and reports output tokens/s, median and p90 time to first token, and each
mode's ratio to `base` measured in the same rounds. Goal: 4 adapters at
>= 0.8x base-only throughput.

    .venv/bin/python benchmarks/lora.py              # 2 rounds, ~12 min
    .venv/bin/python benchmarks/lora.py --rounds 1

Writes benchmarks/results/lora.{json,md,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import openai

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serving import (  # noqa: E402  (the serving benchmark's deployment)
    MODEL_NAME,
    RESULTS,
    checkpoint,
    deployment,
    machine,
    status,
)

from qwen_vllm.loadgen.report import write_json  # noqa: E402
from tests.lora_adapters import AdapterSpec, write_adapter  # noqa: E402

ADAPTERS = 16
MODES = ("base", "1", "4", "16")
BASELINE = "base"
REQUESTS = 32
CONCURRENCY = 8
MAX_TOKENS = 64
GOAL_THROUGHPUT_RATIO = 0.8
GOAL_MODE = "4"


def adapter_name(i: int) -> str:
    return f"ft{i:02d}"


def model_for(mode: str, i: int) -> str:
    """Request i's model: the base, or round-robin over base and adapters."""
    if mode == BASELINE:
        return MODEL_NAME
    names = [MODEL_NAME, *(adapter_name(k) for k in range(int(mode)))]
    return names[i % len(names)]


async def one(client: openai.AsyncOpenAI, model: str, seed: int) -> dict[str, float]:
    started = time.perf_counter()
    first = None
    tokens = 0
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": f"Tell me a story ({seed})."}],
        max_tokens=MAX_TOKENS,
        seed=seed,
        stream=True,
        stream_options={"include_usage": True},
    )
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    return {"ttft": (first or end) - started, "tokens": tokens, "end": end}


async def run_mode(url: str, mode: str, round_number: int) -> dict[str, Any]:
    client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0)
    gate = asyncio.Semaphore(CONCURRENCY)

    async def bounded(i: int) -> dict[str, float]:
        async with gate:
            return await asyncio.wait_for(
                one(client, model_for(mode, i), round_number * REQUESTS + i), 300
            )

    started = time.perf_counter()
    results = await asyncio.gather(*(bounded(i) for i in range(REQUESTS)))
    wall = max(r["end"] for r in results) - started
    await client.close()
    return {
        "mode": mode,
        "round": round_number,
        "tokens": sum(r["tokens"] for r in results),
        "wall_s": wall,
        "ttft_s": [r["ttft"] for r in results],
    }


def summary(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    table = {}
    for mode in MODES:
        mine = [r for r in runs if r["mode"] == mode]
        ttft = sorted(t for r in mine for t in r["ttft_s"])
        table[mode] = {
            "output_tokens_per_s": sum(r["tokens"] for r in mine)
            / sum(r["wall_s"] for r in mine),
            "ttft_median_ms": statistics.median(ttft) * 1000,
            "ttft_p90_ms": statistics.quantiles(ttft, n=10)[-1] * 1000,
        }
    base = table[BASELINE]
    for row in table.values():
        row["throughput_ratio"] = (
            row["output_tokens_per_s"] / base["output_tokens_per_s"]
        )
        row["ttft_added_ms"] = row["ttft_median_ms"] - base["ttft_median_ms"]
    return table


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| adapters in the mix | output tok/s | x base-only | median TTFT ms | +ms "
        "| p90 TTFT ms |",
        "|---|---|---|---|---|---|",
    ]
    for mode, row in result["table"].items():
        label = "none (base-only)" if mode == BASELINE else mode
        lines.append(
            f"| {label} | {row['output_tokens_per_s']:.0f} | "
            f"{row['throughput_ratio']:.2f} | {row['ttft_median_ms']:.0f} | "
            f"{row['ttft_added_ms']:+.0f} | {row['ttft_p90_ms']:.0f} |"
        )
    ratio = result["table"][GOAL_MODE]["throughput_ratio"]
    met = "met" if ratio >= GOAL_THROUGHPUT_RATIO else "missed"
    lines += [
        "",
        f"Goal: {GOAL_MODE} adapters >= {GOAL_THROUGHPUT_RATIO}x base-only "
        f"throughput: {met} ({ratio:.2f}x); {result['rounds']} rounds x "
        f"{REQUESTS} requests per mode, concurrency {CONCURRENCY}, at most "
        f"{MAX_TOKENS} tokens each; {ADAPTERS} adapters loaded throughout.",
    ]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(result["table"])
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.bar(modes, [result["table"][m]["throughput_ratio"] for m in modes])
    left.axhline(GOAL_THROUGHPUT_RATIO, color="red", linestyle="--", label="goal")
    left.set_title("output tokens/s, x base-only")
    left.set_xlabel("adapters in the mix")
    left.legend()
    right.bar(modes, [result["table"][m]["ttft_median_ms"] for m in modes])
    right.set_title("median time to first token (ms)")
    right.set_xlabel("adapters in the mix")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model = checkpoint(workdir)
        status(f"writing {ADAPTERS} adapters ...")
        paths = {
            adapter_name(i): write_adapter(
                model, workdir / adapter_name(i), AdapterSpec(rank=8, alpha=16, seed=i)
            )
            for i in range(ADAPTERS)
        }
        lora = ",".join(f"{name}={path}" for name, path in paths.items())
        info = machine()
        flags = ("--lora", lora)
        with deployment(model, workdir, ["qwen-vllm"], qwen_vllm_flags=flags) as urls:
            url = urls["qwen-vllm"]
            for mode in MODES:  # warm-up: every adapter loaded once, not counted
                asyncio.run(run_mode(url, mode, -1))
            for number in range(args.rounds):
                order = MODES[number % len(MODES) :] + MODES[: number % len(MODES)]
                for mode in order:
                    status(f"round {number + 1}/{args.rounds}: {mode}")
                    runs.append(asyncio.run(run_mode(url, mode, number)))
    result = {
        "command": "benchmarks/lora.py --rounds " + str(args.rounds),
        "rounds": args.rounds,
        "machine": info,
        "table": summary(runs),
        "runs": runs,
    }
    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / "lora.json", result)
    (RESULTS / "lora.md").write_text(markdown(result))
    plot(result, RESULTS / "lora.png")
    print(markdown(result))


if __name__ == "__main__":
    main()
