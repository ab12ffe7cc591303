"""Offline generation throughput: the Qwen v1 plugin against baselines.

On one Qwen v1 checkpoint (random weights, a few hundred million parameters)
and its Qwen2-layout copy (identical math with NTK/logN off), in one process,
rounds interleaved so machine noise hits every engine alike:

  plugin      vLLM + qwen_vllm on the Qwen v1 checkpoint
  vllm-qwen2  vLLM's own Qwen2ForCausalLM on the converted weights (goal: the
              plugin reaches >= 0.97x of it)
  hf          transformers' generate on the converted weights (the seed's
              original serving path)

    .venv/bin/python benchmarks/model_throughput.py           # full (~20 min)
    .venv/bin/python benchmarks/model_throughput.py --quick   # smoke run

Writes benchmarks/results/model_throughput.{json,md,png}.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).resolve().parent / "results"
FULL = {
    "hidden_size": 1024,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "kv_channels": 128,
    "intermediate_size": 5632,
}
QUICK = {
    "hidden_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "kv_channels": 128,
    "intermediate_size": 1024,
}


def status(text: str) -> None:
    sys.stderr.write("\r\033[K" + text if sys.stderr.isatty() else text + "\n")
    sys.stderr.flush()


def checkpoints(workdir: Path, sizes: dict) -> tuple[Path, Path]:
    from qwen_vllm.checkpoints.demo import DemoModelSpec, ensure_demo_model
    from qwen_vllm.checkpoints.qwen2_layout import write_qwen2_checkpoint

    spec = DemoModelSpec(**sizes, dtype="float32", seq_length=2048, seed=1)
    v1 = ensure_demo_model(workdir / "qwen-v1", spec)
    qwen2 = workdir / "qwen2-layout"
    marker = qwen2 / "source.json"
    source = (v1 / "qwen_vllm_demo.json").read_text()
    if not marker.is_file() or marker.read_text() != source:
        write_qwen2_checkpoint(v1, qwen2)
        marker.write_text(source)
    return v1, qwen2


class VllmRunner:
    def __init__(self, path: Path) -> None:
        from vllm import LLM

        self.llm = LLM(model=str(path), dtype="float32", max_model_len=1024, seed=0)

    def run(self, prompts: list[list[int]], new_tokens: int) -> int:
        from vllm import SamplingParams

        params = SamplingParams(
            temperature=0, max_tokens=new_tokens, ignore_eos=True, detokenize=False
        )
        outputs = self.llm.generate(
            [{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False
        )
        return sum(len(o.outputs[0].token_ids) for o in outputs)

    def close(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()


class HfRunner:
    def __init__(self, path: Path) -> None:
        import torch
        from transformers import Qwen2ForCausalLM

        self.torch = torch
        self.model = Qwen2ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def run(self, prompts: list[list[int]], new_tokens: int) -> int:
        ids = self.torch.tensor(prompts)
        with self.torch.no_grad():
            out = self.model.generate(
                ids,
                attention_mask=self.torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        return (out.shape[1] - ids.shape[1]) * ids.shape[0]

    def close(self) -> None:
        del self.model
        gc.collect()


def measure(runner, prompts, new_tokens: int) -> float:
    start = time.perf_counter()
    tokens = runner.run(prompts, new_tokens)
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path.home() / ".cache" / "qwen_vllm" / "bench",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "model_throughput")
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    rounds = args.rounds or (1 if args.quick else 3)
    prompt_len, new_tokens = (32, 8) if args.quick else (128, 64)
    batches = (1, 8) if args.quick else (1, 32)

    status("writing checkpoints ...")
    v1, qwen2 = checkpoints(args.workdir / ("quick" if args.quick else "full"), sizes)
    rng = random.Random(0)
    prompts = {
        b: [[rng.randrange(1000, 150_000) for _ in range(prompt_len)] for _ in range(b)]
        for b in batches
    }
    engines = {}
    for name, factory, path in (
        ("plugin", VllmRunner, v1),
        ("vllm-qwen2", VllmRunner, qwen2),
        ("hf", HfRunner, qwen2),
    ):
        status(f"starting {name} ...")
        engines[name] = factory(path)
        for batch in batches:  # warm-up (compilation, allocator)
            engines[name].run(prompts[batch][:batch], 2)

    samples: dict[str, dict[int, list[float]]] = {
        name: {b: [] for b in batches} for name in engines
    }
    for r in range(rounds):
        for batch in batches:
            for name, runner in engines.items():
                status(f"round {r + 1}/{rounds}: {name} at batch {batch} ...")
                samples[name][batch].append(measure(runner, prompts[batch], new_tokens))
    for runner in engines.values():
        runner.close()

    summary = {
        name: {str(b): statistics.median(v) for b, v in by_batch.items()}
        for name, by_batch in samples.items()
    }
    result = {
        "command": "benchmarks/model_throughput.py"
        + (" --quick" if args.quick else ""),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
        },
        "model": {
            **sizes,
            "dtype": "float32",
            "params_millions": params_millions(sizes),
        },
        "prompt_tokens": prompt_len,
        "new_tokens": new_tokens,
        "rounds": rounds,
        "tokens_per_s": summary,
        "samples": {n: {str(b): v for b, v in s.items()} for n, s in samples.items()},
        "ratios": {
            f"plugin/{other}@{b}": summary["plugin"][str(b)] / summary[other][str(b)]
            for other in ("vllm-qwen2", "hf")
            for b in batches
        },
    }
    write(result, args.out)
    status("")
    print(markdown(result))


def params_millions(sizes: dict) -> float:
    h, n = sizes["hidden_size"], sizes["num_hidden_layers"]
    width = sizes["intermediate_size"] // 2
    per_layer = 4 * h * h + 3 * h + 3 * h * width + 2 * h
    return round((n * per_layer + 2 * 151936 * h + h) / 1e6, 1)


def markdown(result: dict) -> str:
    batches = list(next(iter(result["tokens_per_s"].values())))
    lines = [
        f"Model: {result['model']['params_millions']} M parameters "
        f"({result['model']['num_hidden_layers']} layers, hidden "
        f"{result['model']['hidden_size']}, float32), {result['prompt_tokens']} "
        f"prompt + {result['new_tokens']} new tokens, median of "
        f"{result['rounds']} interleaved rounds.",
        "",
        "| engine | " + " | ".join(f"batch {b} (tok/s)" for b in batches) + " |",
        "|---|" + "---|" * len(batches),
    ]
    for name, by_batch in result["tokens_per_s"].items():
        lines.append(
            f"| {name} | " + " | ".join(f"{by_batch[b]:.1f}" for b in batches) + " |"
        )
    lines += ["", "| ratio | value |", "|---|---|"]
    lines += [f"| {k} | {v:.3f}x |" for k, v in result["ratios"].items()]
    return "\n".join(lines)


def write(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result) + "\n")
    batches = list(next(iter(result["tokens_per_s"].values())))
    names = list(result["tokens_per_s"])
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [result["tokens_per_s"][name][b] for b in batches]
        xs = [j + i * width for j in range(len(batches))]
        ax.bar(xs, values, width, label=name)
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(batches))])
    ax.set_xticklabels([f"batch {b}" for b in batches])
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"Offline generation, {result['model']['params_millions']} M params")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()
