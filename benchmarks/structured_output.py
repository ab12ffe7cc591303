"""Constrained against free decoding: what an output constraint costs.

On one `qwen-vllm serve` deployment (the serving benchmark's checkpoint and
engine flags), streams 32 chat requests at 8 concurrent clients per mode,
up to MAX_TOKENS tokens each (free and JSON answers run to the limit, the
schemas asking for more; a tool call ends with its action, a few tokens
sooner), modes in a rotating order each round:

  free         no constraint (the baseline)
  json         response_format json_schema, one schema (compiled once, cached)
  json-new     a schema never seen before on every request (compiled each time)
  tool         tool_choice "required": a ReAct thought, then an action

and reports output tokens/s, median and p90 time to first token, and each
mode's ratio to `free` measured in the same rounds. Goal: >= 0.8x throughput.

Then the test suite's JSON schemas (tests/serving/test_structured_output.py),
PARSE_SEEDS requests each, as response_format to our gateway and to plain
`vllm serve` with the plugin (vLLM's default structured-output settings) on
the same checkpoint: how many answers parse and validate, and how many ran
out of tokens.

    .venv/bin/python benchmarks/structured_output.py            # 3 rounds, ~5 min
    .venv/bin/python benchmarks/structured_output.py --rounds 1

Writes benchmarks/results/structured_output.{json,md,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import jsonschema
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
from streams import (  # noqa: E402
    CONCURRENCY,
    MAX_TOKENS,
    REQUESTS,
    rotations,
    run_mode,
    summary,
)

from qwen_vllm.loadgen.report import write_json  # noqa: E402
from tests.serving.test_structured_output import SCHEMAS  # noqa: E402

MODES = ("free", "json", "json-new", "tool")
BASELINE = "free"
GOAL_THROUGHPUT_RATIO = 0.8
PARSE_SEEDS = 4
PARSE_MAX_TOKENS = 256
# 40 numbers never fit in MAX_TOKENS tokens: every answer is cut at the limit.
LONG_ARRAY = {"type": "array", "items": {"type": "integer"}, "minItems": 40}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 20}},
                "required": ["city"],
            },
        },
    }
]
_fresh = itertools.count()


def request_fields(mode: str) -> dict[str, Any]:
    if mode == "free":
        return {}
    if mode == "tool":
        return {"tools": TOOLS, "tool_choice": "required"}
    schema = LONG_ARRAY
    if mode == "json-new":  # a new bound makes a new grammar
        schema = {**LONG_ARRAY, "maxItems": 1000 + next(_fresh)}
    return {
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "numbers", "schema": schema},
        }
    }


def request_for(mode: str):
    def request(i: int, seed: int) -> dict[str, Any]:
        return {
            "model": MODEL_NAME,
            "messages": [{"role": "user", "content": f"List some numbers ({seed})."}],
            "seed": seed,
            **request_fields(mode),
        }

    return request


async def parse_rate(url: str) -> dict[str, int]:
    """Answers to response_format json_schema: how many parse and validate,
    and how many ran out of tokens."""
    client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0)
    gate = asyncio.Semaphore(CONCURRENCY)

    async def check(schema: dict[str, Any], seed: int) -> tuple[bool, bool]:
        async with gate:
            reply = await asyncio.wait_for(
                client.chat.completions.create(
                    model=MODEL_NAME,
                    messages=[{"role": "user", "content": "Answer in JSON."}],
                    max_tokens=PARSE_MAX_TOKENS,
                    seed=seed,
                    response_format={
                        "type": "json_schema",
                        "json_schema": {"name": "answer", "schema": schema},
                    },
                ),
                timeout=300,
            )
        choice = reply.choices[0]
        cut = choice.finish_reason == "length"
        try:
            jsonschema.validate(json.loads(choice.message.content), schema)
        except (ValueError, jsonschema.ValidationError):
            return False, cut
        return True, cut

    checks = [check(s, seed) for s in SCHEMAS for seed in range(PARSE_SEEDS)]
    results = await asyncio.gather(*checks)
    await client.close()
    return {
        "valid": sum(valid for valid, _ in results),
        "cut_at_max_tokens": sum(cut for _, cut in results),
        "requests": len(results),
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| mode | output tok/s | x free | median TTFT ms | +ms | p90 TTFT ms "
        "| tokens/request |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, row in result["table"].items():
        lines.append(
            f"| {mode} | {row['output_tokens_per_s']:.0f} | "
            f"{row['throughput_ratio']:.2f} | {row['ttft_median_ms']:.0f} | "
            f"{row['ttft_added_ms']:+.0f} | {row['ttft_p90_ms']:.0f} | "
            f"{row['tokens_per_request']:.0f} |"
        )
    worst = min(
        row["throughput_ratio"] for m, row in result["table"].items() if m != BASELINE
    )
    met = "met" if worst >= GOAL_THROUGHPUT_RATIO else "missed"
    lines += [
        "",
        f"Goal >= {GOAL_THROUGHPUT_RATIO}x throughput: {met} (worst {worst:.2f}x); "
        f"{result['rounds']} rounds x {REQUESTS} requests per mode, "
        f"concurrency {CONCURRENCY}, at most {MAX_TOKENS} tokens each.",
    ]
    lines += [
        "",
        "| server | answers that parse and validate "
        f"| cut at {PARSE_MAX_TOKENS} tokens |",
        "|---|---|---|",
    ]
    for server, rate in result["parse_rate"].items():
        lines.append(
            f"| {server} | {rate['valid']} / {rate['requests']} "
            f"| {rate['cut_at_max_tokens']} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(result["table"])
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.bar(modes, [result["table"][m]["throughput_ratio"] for m in modes])
    left.axhline(GOAL_THROUGHPUT_RATIO, color="red", linestyle="--", label="goal")
    left.set_title("output tokens/s, x free decoding")
    left.legend()
    right.bar(modes, [result["table"][m]["ttft_median_ms"] for m in modes])
    right.set_title("median time to first token (ms)")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model = checkpoint(workdir)
        info = machine()
        with deployment(model, workdir, ["qwen-vllm", "vllm"]) as urls:
            url = urls["qwen-vllm"]
            # Warm-up, not counted.
            asyncio.run(run_mode(url, BASELINE, -1, request_for(BASELINE)))
            for number, mode in rotations(MODES, args.rounds):
                status(f"round {number + 1}/{args.rounds}: {mode}")
                runs.append(asyncio.run(run_mode(url, mode, number, request_for(mode))))
            rates = {}
            for server, label in (
                ("qwen-vllm", "qwen-vllm gateway"),
                ("vllm", "vllm serve"),
            ):
                status(f"parse rate: {label}")
                rates[label] = asyncio.run(parse_rate(urls[server]))
    result = {
        "command": "benchmarks/structured_output.py --rounds " + str(args.rounds),
        "rounds": args.rounds,
        "machine": info,
        "table": summary(runs, list(MODES), BASELINE),
        "parse_rate": rates,
        "runs": runs,
    }
    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / "structured_output.json", result)
    (RESULTS / "structured_output.md").write_text(markdown(result))
    plot(result, RESULTS / "structured_output.png")
    print(markdown(result))


if __name__ == "__main__":
    main()
