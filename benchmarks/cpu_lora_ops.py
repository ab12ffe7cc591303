"""vLLM's CPU LoRA ops against the plugin's (qwen_vllm/model/cpu_lora.py).

The shrink and expand of one LoRA-wrapped linear layer with Qwen-7B's sizes
(hidden 4096, an output of 4096, rank 16, 4 adapter slots), for a decode
batch of 8 tokens and a prefill of 512, with every token on the base model
(LoRA on, no adapter asked for) and with the tokens spread over the base and
4 adapters. vLLM 0.32's ops (reloaded from vllm/lora/ops/torch_ops, before
the plugin's patch) and ours run the same inputs in turn, in one process,
ROUNDS rounds of REPEATS calls each; reports the median time per call and
the ratio.

    .venv/bin/python benchmarks/cpu_lora_ops.py      # ~1 min

Writes benchmarks/results/cpu_lora_ops.{json,md,png}.
"""

from __future__ import annotations

import importlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwen_vllm.loadgen.report import markdown_table, write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
HIDDEN, OUT, RANK, SLOTS = 4096, 4096, 16, 4
BATCHES = {"decode, 8 tokens": 8, "prefill, 512 tokens": 512}
MIXES = ("base only", "base + 4 adapters")
ROUNDS, REPEATS = 5, 10


def vllm_ops():
    """vLLM's module as shipped: the plugin replaces its functions."""
    import vllm.lora.ops.torch_ops.lora_ops as lora_ops

    return importlib.reload(lora_ops)


def layer(ops, x, a, b, indices, buffer, y) -> None:
    ops.bgmv_shrink(x, a, buffer, indices, 1.0)
    ops.bgmv_expand(buffer, b, y, indices, True)


def seconds_per_call(ops, inputs) -> float:
    layer(ops, *inputs)
    started = time.perf_counter()
    for _ in range(REPEATS):
        layer(ops, *inputs)
    return (time.perf_counter() - started) / REPEATS


def main() -> None:
    from qwen_vllm.model import cpu_lora

    torch.manual_seed(0)
    systems = {"vllm": vllm_ops(), "qwen_vllm": cpu_lora}
    rows = []
    for batch, tokens in BATCHES.items():
        for mix in MIXES:
            if mix == "base only":
                indices = torch.full((tokens,), -1)
            else:  # round-robin over the base (-1) and slots 0-3
                indices = torch.arange(tokens) % (SLOTS + 1) - 1
            inputs = (
                torch.randn(tokens, HIDDEN),
                torch.randn(SLOTS, 1, RANK, HIDDEN),
                torch.randn(SLOTS, 1, OUT, RANK),
                indices,
                torch.zeros(tokens, RANK),
                torch.zeros(tokens, OUT),
            )
            times = {name: [] for name in systems}
            for _ in range(ROUNDS):  # alternated, so noise hits both alike
                for name, ops in systems.items():
                    times[name].append(seconds_per_call(ops, inputs))
            median = {name: statistics.median(t) * 1000 for name, t in times.items()}
            rows.append(
                {
                    "batch": batch,
                    "mix": mix,
                    "vllm_ms": median["vllm"],
                    "qwen_vllm_ms": median["qwen_vllm"],
                    "speedup": median["vllm"] / median["qwen_vllm"],
                }
            )
            print(rows[-1], file=sys.stderr)
    result = {
        "command": "benchmarks/cpu_lora_ops.py",
        "sizes": {"hidden": HIDDEN, "out": OUT, "rank": RANK, "slots": SLOTS},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / "cpu_lora_ops.json", result)
    table = markdown_table(
        ["batch", "tokens", "vLLM's ops ms", "ours ms", "x faster"],
        [
            [
                r["batch"],
                r["mix"],
                f"{r['vllm_ms']:.2f}",
                f"{r['qwen_vllm_ms']:.2f}",
                f"{r['speedup']:.1f}",
            ]
            for r in rows
        ],
    )
    (RESULTS / "cpu_lora_ops.md").write_text(table + "\n")
    plot(rows, RESULTS / "cpu_lora_ops.png")
    print(table)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['batch']}\n{r['mix']}" for r in rows]
    positions = range(len(rows))
    figure, axis = plt.subplots(figsize=(9, 4))
    width = 0.4
    axis.bar(
        [p - width / 2 for p in positions],
        [r["vllm_ms"] for r in rows],
        width,
        label="vLLM 0.32's CPU ops",
    )
    axis.bar(
        [p + width / 2 for p in positions],
        [r["qwen_vllm_ms"] for r in rows],
        width,
        label="qwen_vllm's grouped ops",
    )
    axis.set_xticks(list(positions), labels)
    axis.set_yscale("log")
    axis.set_ylabel("ms per LoRA layer (shrink + expand), log scale")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


if __name__ == "__main__":
    main()
