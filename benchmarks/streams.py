"""Rounds of streamed chat requests in modes, and their table: the load that
benchmarks/lora.py and benchmarks/structured_output.py measure each mode with.

A mode's run streams `requests` chat requests, at most `concurrency` at a
time, each up to `max_tokens` tokens; it records the output tokens, the wall
time, and each request's time to its first content or tool-call delta.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from typing import Any

import openai

REQUESTS = 32
CONCURRENCY = 8
MAX_TOKENS = 64


async def stream_one(
    client: openai.AsyncOpenAI, request: dict[str, Any]
) -> dict[str, float]:
    started = time.perf_counter()
    first = None
    tokens = 0
    stream = await client.chat.completions.create(
        **request,
        max_tokens=MAX_TOKENS,
        stream=True,
        stream_options={"include_usage": True},
    )
    async for chunk in stream:
        if first is None and chunk.choices:
            delta = chunk.choices[0].delta
            if delta.content or delta.tool_calls:
                first = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    return {"ttft": (first or end) - started, "tokens": tokens, "end": end}


async def run_mode(
    url: str,
    mode: str,
    round_number: int,
    request_for: Callable[[int, int], dict[str, Any]],
) -> dict[str, Any]:
    """One round of a mode; request_for(i, seed) is request i's create()
    arguments (model, messages, seed, fields)."""
    client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0)
    gate = asyncio.Semaphore(CONCURRENCY)

    async def bounded(i: int) -> dict[str, float]:
        async with gate:
            request = request_for(i, round_number * REQUESTS + i)
            return await asyncio.wait_for(stream_one(client, request), timeout=300)

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


def summary(
    runs: list[dict[str, Any]], modes: list[str], baseline: str
) -> dict[str, dict[str, float]]:
    """Per mode over its rounds: output tokens/s, TTFT median and p90, tokens
    per request, and the ratio and added TTFT against the baseline mode."""
    table = {}
    for mode in modes:
        mine = [r for r in runs if r["mode"] == mode]
        ttft = sorted(t for r in mine for t in r["ttft_s"])
        table[mode] = {
            "output_tokens_per_s": sum(r["tokens"] for r in mine)
            / sum(r["wall_s"] for r in mine),
            "ttft_median_ms": statistics.median(ttft) * 1000,
            "ttft_p90_ms": statistics.quantiles(ttft, n=10)[-1] * 1000,
            "tokens_per_request": sum(r["tokens"] for r in mine)
            / (REQUESTS * len(mine)),
        }
    base = table[baseline]
    for row in table.values():
        row["throughput_ratio"] = (
            row["output_tokens_per_s"] / base["output_tokens_per_s"]
        )
        row["ttft_added_ms"] = row["ttft_median_ms"] - base["ttft_median_ms"]
    return table


def rotations(modes: tuple, rounds: int):
    """(round, mode) in a rotating order each round, so the machine's noise
    hits every mode alike."""
    for number in range(rounds):
        shift = number % len(modes)
        for mode in modes[shift:] + modes[:shift]:
            yield number, mode
