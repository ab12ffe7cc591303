"""Where qwen-vllm's first-token latency goes, hop by hop.

On one `qwen-vllm serve` deployment (the serving benchmark's checkpoint and
engine flags), sends in turn, in a shuffled order each round, with a pause
between calls so that only one is ever in flight:

  lookup   the controller's /get_worker_address (what the gateway asks first)
  worker   a streamed one-token chat straight to the worker (FastChat protocol)
  gateway  the same chat through the OpenAI gateway (lookup + worker + itself)

and reports the latency to the first token (the whole reply for the lookup)
and, pairing the calls of each round, what the gateway adds over the worker.
The worker alone against `vllm serve` is what benchmarks/serving.py compares.

    .venv/bin/python benchmarks/ttft_breakdown.py             # 150 rounds, ~2 min
    .venv/bin/python benchmarks/ttft_breakdown.py --rounds 30

Writes benchmarks/results/ttft_breakdown.{json,md,png}.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving import (  # noqa: E402  (the serving benchmark's deployment)
    MODEL_NAME,
    RESULTS,
    checkpoint,
    deployment,
    machine,
    status,
)

from qwen_vllm.loadgen.report import write_json  # noqa: E402
from qwen_vllm.loadgen.results import percentiles  # noqa: E402

CALLS = ("lookup", "worker", "gateway")
PAUSE_S = 0.1
MESSAGES = [{"role": "user", "content": "hi"}]


def first_token_ms(client: httpx.Client, call: str, urls: dict[str, str]) -> float:
    started = time.perf_counter()
    if call == "lookup":
        reply = client.post(
            urls["controller"] + "/get_worker_address", json={"model": MODEL_NAME}
        )
        if not reply.json().get("address"):
            raise RuntimeError(f"the controller has no worker: {reply.text}")
    elif call == "worker":
        body = {
            "model": MODEL_NAME,
            "messages": MESSAGES,
            "max_new_tokens": 1,
            "temperature": 0,
        }
        url = urls["worker"] + "/worker_generate_stream"
        with client.stream("POST", url, json=body) as reply:
            for raw in reply.iter_bytes():
                if raw.strip(b"\0"):
                    break
    else:
        body = {
            "model": MODEL_NAME,
            "messages": MESSAGES,
            "max_tokens": 1,
            "stream": True,
            "temperature": 0,
        }
        url = urls["gateway"] + "/chat/completions"
        with client.stream("POST", url, json=body) as reply:
            for line in reply.iter_lines():
                if '"content":"' in line and '"content":""' not in line:
                    break
    return (time.perf_counter() - started) * 1000


def measure(urls: dict[str, str], rounds: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {call: [] for call in CALLS}
    order = list(CALLS)
    rng = random.Random(0)
    with httpx.Client(timeout=60) as client:
        for call in CALLS:  # warm-up: connections, first-request paths
            first_token_ms(client, call, urls)
        for index in range(rounds):
            status(f"round {index + 1}/{rounds}")
            rng.shuffle(order)
            for call in order:
                time.sleep(PAUSE_S)
                samples[call].append(first_token_ms(client, call, urls))
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=150)
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path.home() / ".cache" / "qwen_vllm" / "bench" / "serving",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "ttft_breakdown")
    args = parser.parse_args()
    if not 1 <= args.rounds <= 10_000:
        parser.error("--rounds must be between 1 and 10000")

    started_at = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    status("writing the checkpoint ...")
    model_dir = checkpoint(args.workdir)
    ports: dict[str, int] = {}
    with deployment(model_dir, args.workdir, ["qwen-vllm"], ports) as openai_urls:
        urls = {
            "gateway": openai_urls["qwen-vllm"],
            "controller": f"http://127.0.0.1:{ports['controller']}",
            "worker": f"http://127.0.0.1:{ports['worker']}",
        }
        samples = measure(urls, args.rounds)
    command = "benchmarks/ttft_breakdown.py " + " ".join(sys.argv[1:])
    result = {
        "command": command.strip(),
        "started_at": started_at,
        "machine": machine(),
        "rounds": args.rounds,
        "samples_ms": samples,
    }
    write_report(result, args.out)


def write_report(result: dict, out: Path) -> None:
    """Percentiles of each call and of the gateway's paired addition: the
    JSON (with every sample), .md and .png."""
    samples = result["samples_ms"]
    added = [g - w for g, w in zip(samples["gateway"], samples["worker"], strict=True)]
    table = {call: percentiles(values) for call, values in samples.items()}
    table["gateway - worker (paired)"] = percentiles(added)
    result["table"] = table
    lines = [
        f"`{result['command']}`, {result['started_at']}, {result['rounds']} rounds",
        "",
        "| call | p50 ms | p90 ms | p99 ms |",
        "|---|---|---|---|",
    ]
    for call, row in table.items():
        lines.append(
            f"| {call} | {row['p50']:.2f} | {row['p90']:.2f} | {row['p99']:.2f} |"
        )
    text = "\n".join(lines)
    print("\n" + text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text + "\n")
    write_json(out.with_suffix(".json"), result)
    plot(samples, added, out.with_suffix(".png"))


def plot(samples: dict[str, list[float]], added: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.boxplot(list(samples.values()), showfliers=False)
    left.set_xticks(range(1, len(samples) + 1), list(samples))
    left.set_ylabel("ms to the first token (lookup: to the reply)")
    left.set_title("one call at a time")
    right.hist(added, bins=40)
    right.axvline(statistics.median(added), color="black", linestyle="--")
    right.set_xlabel("gateway - worker, same round (ms)")
    right.set_title("what the gateway adds")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    main()
