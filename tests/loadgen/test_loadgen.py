"""The load generator against the real gateway app over a scripted backend."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn

from qwen_vllm.cli import bench as bench_cli
from qwen_vllm.loadgen.procs import listening_pids, pid_source, sample
from qwen_vllm.loadgen.results import CLEAN_FAILURES, HUNG, percentiles
from qwen_vllm.loadgen.runner import LoadGenerator
from qwen_vllm.loadgen.workload import LengthRange, LoadConfig, request_specs
from qwen_vllm.serving.client import NoWorkerError
from qwen_vllm.serving.gateway import create_app
from tests.conftest import free_port
from tests.serving.test_gateway import KEY, MODEL, FakeBackend, Reply, make_settings


def config(**overrides) -> LoadConfig:
    values = {
        "base_url": "http://gateway/v1",
        "model": MODEL,
        "api_key": KEY,
        "concurrency": 4,
        "num_requests": 12,
        "max_duration": 30.0,
        "error_backoff": 0.0,
    }
    values.update(overrides)
    return LoadConfig(**values)


def generator(backend: FakeBackend, **overrides) -> LoadGenerator:
    app = create_app(make_settings(api_keys=[KEY]), backend)
    return LoadGenerator(config(**overrides), transport=httpx.ASGITransport(app=app))


def test_request_sequence_is_seeded_and_within_bounds() -> None:
    prompt, output = LengthRange(8, 300), LengthRange.parse("4-64")
    first = request_specs(200, prompt, output, seed=3)
    assert first == request_specs(200, prompt, output, seed=3)
    assert first != request_specs(200, prompt, output, seed=4)
    assert all(8 <= s.prompt_words <= 300 for s in first)
    assert all(len(s.prompt.split()) == s.prompt_words for s in first)
    assert all(4 <= s.max_tokens <= 64 for s in first)
    # Log-uniform: mixed lengths, short ones more common than long ones.
    lengths = sorted(s.prompt_words for s in first)
    assert lengths[0] < 20 and lengths[-1] > 150
    assert lengths[len(lengths) // 2] < (8 + 300) / 2
    assert LengthRange.parse("32") == LengthRange(32, 32)
    with pytest.raises(ValueError):
        LengthRange.parse("9-3")


def test_percentiles_match_numpy() -> None:
    values = [0.3, 0.1, 5.0, 2.2, 0.7, 0.05, 1.0]
    stats = percentiles(values)
    for q in (50, 90, 99):
        assert stats[f"p{q}"] == pytest.approx(np.percentile(values, q))
    assert stats["max"] == 5.0
    assert percentiles([])["p50"] is None


SSE = "text/event-stream"


def scripted(*chunks: bytes, content_type: str = SSE) -> LoadGenerator:
    """A generator whose one request gets these bytes back, chunk by chunk."""

    async def body():
        for chunk in chunks:
            yield chunk

    def reply(request: httpx.Request) -> httpx.Response:
        headers = {"content-type": content_type}
        return httpx.Response(200, headers=headers, content=body())

    return LoadGenerator(
        config(concurrency=1, num_requests=1), transport=httpx.MockTransport(reply)
    )


async def test_event_streams_are_parsed_as_sse() -> None:
    # Comments, an event without data, CRLF, chunks cut mid-line and JSON
    # spread over several data lines (joined by newlines).
    load = scripted(
        b': keep-alive\r\n\r\nid: 1\r\n\r\ndata: {"choices": [{"delta": {"con',
        b'tent": "Hi"}}]}\r\n\r\n',
        b'data: {"choices": [{"delta": {"content": " there"},\n',
        b'data: "finish_reason": "stop"}],\n',
        b'data: "usage": {"prompt_tokens": 3, "completion_tokens": 2}}\n\n',
        b"data:[DONE]\n\n",
    )
    [request] = (await load.run()).requests
    assert request.ok, request.message
    assert (request.output_tokens, request.prompt_tokens) == (2, 3)
    assert request.finish_reason == "stop" and len(request.itl) == 1


@pytest.mark.parametrize(
    ("stream", "content_type", "kind"),
    [
        (b'data: {"choices": []}\n\n', SSE, "incomplete"),  # no [DONE]
        (b'data: {"error": {"message": "boom"}}\n\n', SSE, "error_event"),
        (b"data: not json\n\n", SSE, "bad_event"),
        (b'{"choices": []}', "application/json", "incomplete"),  # not a stream
    ],
)
async def test_bad_streams_are_classified(
    stream: bytes, content_type: str, kind: str
) -> None:
    load = scripted(stream, content_type=content_type)
    [request] = (await load.run()).requests
    assert (request.ok, request.kind, request.status) == (False, kind, 200)


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
async def test_streams_are_timed_and_tokens_counted(endpoint: str) -> None:
    backend = FakeBackend()
    backend.respond = lambda params: Reply(text="abcdefghijklmnopqrstuvwx", piece=3)
    load = generator(backend, endpoint=endpoint, num_requests=12, concurrency=4)
    run = await load.run()
    summary = run.summary()
    assert summary["requests"] == {"sent": 12, "succeeded": 12, "failed": 0}
    assert len(backend.calls) == 12
    # Every request asked for its seeded max_tokens, as chat or completion.
    specs = request_specs(12, LengthRange(16, 256), LengthRange(16, 128), 0)
    assert sorted(c.max_new_tokens for c in backend.calls) == sorted(
        s.max_tokens for s in specs
    )
    for request in run.requests:
        # 24 characters in chunks of 3: 8 content events, usage from the backend.
        assert len(request.itl) == 7
        assert request.output_tokens == 24 // 2 + 1
        assert request.prompt_tokens == 7
        assert 0 < request.ttft <= request.latency
        assert request.tpot is not None
    assert summary["throughput"]["output_tokens"] == 12 * 13
    assert summary["ttft_s"]["p50"] is not None
    assert summary["itl_s"]["p99"] is not None
    progress = load.progress()
    assert progress.line(12).startswith("12/12 done, 0 in flight, 0 failed")
    assert progress.line(None).startswith("12 done, 0 in flight")


async def test_failures_are_classified() -> None:
    backend = FakeBackend()
    replies = {
        0: Reply(fail_after=1),  # an error event after streaming began
        1: Reply(hang_after=1),  # silent: must be reported as a hang
        2: Reply(error_code=40303),  # refused before streaming: HTTP 400
    }
    order = iter(range(100))
    backend.respond = lambda params: replies.get(next(order), Reply())
    # In-process transports have no read timeouts: the request timeout ends
    # the silent stream.
    load = generator(backend, concurrency=1, num_requests=4, request_timeout=0.5)
    run = await load.run()
    kinds = [r.kind for r in run.requests]
    assert kinds == ["error_event", HUNG, "http", None]
    assert run.requests[2].status == 400
    assert "context_length_exceeded" in run.requests[2].message
    assert {"error_event", "http"} <= CLEAN_FAILURES and HUNG not in CLEAN_FAILURES
    assert run.summary()["errors"] == {"error_event": 1, "http": 1, HUNG: 1}

    backend.error = NoWorkerError("no worker")
    unavailable = await generator(backend, num_requests=2).run()
    assert {r.status for r in unavailable.requests} == {503}


async def test_refused_connections_are_clean_failures() -> None:
    load = LoadGenerator(
        config(base_url=f"http://127.0.0.1:{free_port()}/v1", num_requests=3)
    )
    run = await load.run()
    assert [r.kind for r in run.requests] == ["connect"] * 3


async def test_bounds_stop_the_run() -> None:
    backend = FakeBackend()
    backend.respond = lambda params: Reply(hang_after=0)
    load = generator(backend, num_requests=1000, max_duration=0.3, request_timeout=0.2)
    started = time.monotonic()
    run = await load.run()
    assert time.monotonic() - started < 5
    assert 0 < len(run.requests) < 1000
    assert {r.kind for r in run.requests} == {HUNG}

    stopped = generator(FakeBackend(), num_requests=10**6, max_duration=60)
    task = asyncio.create_task(stopped.run())
    await asyncio.sleep(0.2)
    stopped.stop()
    run = await asyncio.wait_for(task, 5)
    assert 0 < len(run.requests) < 10**6


async def test_soak_samples_watched_processes() -> None:
    label, source = pid_source(str(os.getpid()))
    load = LoadGenerator(
        config(num_requests=10**6, max_duration=0.6),
        transport=httpx.ASGITransport(
            app=create_app(make_settings(api_keys=[KEY]), FakeBackend())
        ),
        watch={label: source, "gone": lambda: None},
        sample_interval=0.1,
    )
    run = await load.run()
    processes = run.summary()["processes"]
    mine = processes[label]
    assert mine["pids"] == [os.getpid()] and mine["samples"] >= 3
    assert mine["rss_mib"]["max"] >= mine["rss_mib"]["start"] > 10
    assert mine["open_fds"]["start"] > 0
    assert processes["gone"] == {"pids": [], "samples": 0}
    assert sample(2**22 + 1) is None


def test_listening_pids_finds_the_owner_of_a_port() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        port = server.getsockname()[1]
        assert listening_pids(port) == []  # bound, not listening yet
        server.listen()
        assert listening_pids(port) == [os.getpid()]
        assert pid_source(f"port:{port}")[1]() == os.getpid()
    with pytest.raises(ValueError):
        pid_source("gateway")


def test_bench_command_writes_json_and_plot(tmp_path: Path) -> None:
    app = create_app(make_settings(api_keys=[KEY]), FakeBackend())
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        parser = argparse.ArgumentParser()
        bench_cli.add_bench_parser(parser.add_subparsers())
        output = tmp_path / "out" / "run.json"
        args = parser.parse_args(
            [
                "bench",
                "--url",
                f"http://127.0.0.1:{port}/v1",
                "--api-key",
                KEY,
                "--num-requests",
                "10",
                "--concurrency",
                "3",
                "--output",
                str(output),
            ]
        )
        args.run(args)
    finally:
        server.should_exit = True
        thread.join(10)
    data = json.loads(output.read_text())
    assert data["config"]["model"] == MODEL  # discovered from /v1/models
    assert "api_key" not in data["config"]
    assert data["summary"]["requests"]["succeeded"] == 10
    assert len(data["requests"]) == 10
    assert output.with_suffix(".png").stat().st_size > 10_000
