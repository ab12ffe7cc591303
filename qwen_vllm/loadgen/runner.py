"""An async load generator for OpenAI-compatible streaming APIs.

It keeps a fixed number of clients busy, each streaming one request after
another (chat or completions, Server-Sent Events read with httpx-sse), until a
request count or a time bound is reached. Per request it records the time to
first token, the gaps between tokens and the output tokens; failures are
classified by kind so a fault-injection run can tell a clean error from a hang.

Soak mode is the same loop bounded by time, sampling the memory and open file
descriptors of chosen processes every few seconds (see procs.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import httpx
from httpx_sse import ServerSentEvent, SSEError, aconnect_sse

from qwen_vllm.loadgen.procs import PidSource, sample
from qwen_vllm.loadgen.results import (
    HUNG,
    Progress,
    RequestResult,
    RunResult,
    WatchSample,
    percentiles,
)
from qwen_vllm.loadgen.workload import LoadConfig, RequestSpec, request_specs

ENDPOINT_PATHS = {"chat": "/chat/completions", "completions": "/completions"}


def _error_message(body: bytes) -> tuple[str | None, str]:
    """(code, message) of an OpenAI-style (or FastChat-style) error body."""
    try:
        data = json.loads(body)
    except ValueError:
        return None, body[:200].decode(errors="replace")
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict):
            return error.get("code"), str(error.get("message"))
        if "error_code" in data or "text" in data:  # FastChat's error chunk
            return str(data.get("error_code")), str(data.get("text"))
        if "detail" in data:
            return None, str(data["detail"])
    return None, str(data)[:200]


class LoadGenerator:
    """Runs one load configuration; stop() ends it early from another task."""

    def __init__(
        self,
        config: LoadConfig,
        *,
        specs: Sequence[RequestSpec] | None = None,
        watch: dict[str, PidSource] | None = None,
        sample_interval: float = 5.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.config = config
        self.transport = transport  # tests: an in-process app
        self.specs = list(specs) if specs is not None else self._default_specs()
        if not self.specs:
            raise ValueError("no requests to send")
        self.watch = watch or {}
        self.sample_interval = sample_interval
        self.results: list[RequestResult] = []
        self.samples: list[WatchSample] = []
        self.t0 = 0.0  # time.monotonic() at the start of the run
        self._sent = 0
        self._in_flight = 0
        self._stop = asyncio.Event()

    def _default_specs(self) -> list[RequestSpec]:
        # Soak runs cycle through the list; a few thousand distinct prompts
        # keep the engine's prefix cache from making them artificially cheap.
        count = min(self.config.num_requests, 4096)
        c = self.config
        return request_specs(count, c.prompt_tokens, c.output_tokens, c.seed)

    def now(self) -> float:
        """Seconds since the start of the run, on the clock of the results."""
        return time.monotonic() - self.t0

    def stop(self) -> None:
        self._stop.set()

    def progress(self) -> Progress:
        ok = [r for r in self.results if r.ok]
        ttfts = [r.ttft for r in ok[-200:] if r.ttft is not None]
        return Progress(
            done=len(self.results),
            failed=len(self.results) - len(ok),
            in_flight=self._in_flight,
            output_tokens=sum(r.output_tokens for r in ok),
            elapsed=self.now(),
            ttft_p50=percentiles(ttfts)["p50"],
        )

    async def run(
        self,
        on_progress: Callable[[Progress], None] | None = None,
        progress_interval: float = 1.0,
    ) -> RunResult:
        c = self.config
        started_at = datetime.now(UTC).isoformat(timespec="seconds")
        headers = {"Authorization": f"Bearer {c.api_key}"} if c.api_key else {}
        limits = httpx.Limits(
            max_connections=c.concurrency, max_keepalive_connections=c.concurrency
        )
        timeout = httpx.Timeout(
            c.stall_timeout, connect=c.connect_timeout, pool=c.connect_timeout
        )
        self.t0 = time.monotonic()
        deadline = c.max_duration
        async with httpx.AsyncClient(
            base_url=c.base_url.rstrip("/"),
            headers=headers,
            limits=limits,
            timeout=timeout,
            trust_env=False,  # load goes straight to the server, never a proxy
            transport=self.transport,
        ) as client:

            async def client_loop() -> None:
                while not self._stop.is_set() and self.now() < deadline:
                    if self._sent >= c.num_requests:
                        return
                    index = self._sent
                    self._sent += 1
                    spec = self.specs[index % len(self.specs)]
                    self._in_flight += 1
                    try:
                        result = await self._one(client, index, spec)
                    finally:
                        self._in_flight -= 1
                    self.results.append(result)
                    if not result.ok and c.error_backoff > 0:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._stop.wait(), c.error_backoff)

            helpers = []
            if self.watch:
                helpers.append(asyncio.create_task(self._sample_forever()))
            if on_progress is not None:
                helpers.append(
                    asyncio.create_task(
                        self._report_forever(on_progress, progress_interval)
                    )
                )
            try:
                await asyncio.gather(*(client_loop() for _ in range(c.concurrency)))
            finally:
                for task in helpers:
                    task.cancel()
                await asyncio.gather(*helpers, return_exceptions=True)
        if self.watch:
            await self._sample_once()
        if on_progress is not None:
            on_progress(self.progress())
        ends = [r.end for r in self.results]
        duration = max(ends) if ends else self.now()
        self.results.sort(key=lambda r: r.index)
        return RunResult(c, started_at, duration, self.results, self.samples)

    async def _report_forever(
        self, on_progress: Callable[[Progress], None], interval: float
    ) -> None:
        while True:
            on_progress(self.progress())
            await asyncio.sleep(interval)

    async def _sample_forever(self) -> None:
        while True:
            await self._sample_once()
            await asyncio.sleep(self.sample_interval)

    async def _sample_once(self) -> None:
        # Process scans and /health calls block: keep them off the event loop
        # that times the requests.
        def collect() -> list[WatchSample]:
            taken = []
            for label, source in self.watch.items():
                pid = source()
                found = sample(pid) if pid is not None else None
                taken.append(
                    WatchSample(
                        self.now(),
                        label,
                        pid if found else None,
                        found.rss_bytes if found else None,
                        found.open_fds if found else None,
                    )
                )
            return taken

        self.samples.extend(await asyncio.to_thread(collect))

    def body(self, spec: RequestSpec) -> dict[str, Any]:
        c = self.config
        body: dict[str, Any] = {
            "model": c.model,
            "max_tokens": spec.max_tokens,
            "temperature": c.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if c.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": spec.prompt}]
        else:
            body["prompt"] = spec.prompt
        body.update(c.extra_body)
        return body

    async def _one(
        self, client: httpx.AsyncClient, index: int, spec: RequestSpec
    ) -> RequestResult:
        result = RequestResult(index, self.now(), max_tokens=spec.max_tokens)
        try:
            async with asyncio.timeout(self.config.request_timeout):
                await self._stream(client, spec, result)
        except TimeoutError:
            result.kind, result.message = HUNG, "no answer within the request timeout"
        except httpx.TimeoutException as exc:
            result.kind = "connect" if isinstance(exc, httpx.ConnectTimeout) else HUNG
            result.message = f"{type(exc).__name__}: {exc}"
        except httpx.ConnectError as exc:
            result.kind, result.message = "connect", f"ConnectError: {exc}"
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
            result.kind = "disconnected"
            result.message = f"{type(exc).__name__}: {exc}"
        except SSEError as exc:  # a 200 that is no event stream: it has no [DONE]
            result.kind, result.message = "incomplete", str(exc)
        except httpx.HTTPError as exc:
            result.kind, result.message = "http_client", f"{type(exc).__name__}: {exc}"
        except ValueError as exc:  # an event that is not JSON
            result.kind, result.message = "bad_event", str(exc)[:200]
        result.end = self.now()
        result.ok = result.kind is None
        return result

    async def _stream(
        self, client: httpx.AsyncClient, spec: RequestSpec, result: RequestResult
    ) -> None:
        path = ENDPOINT_PATHS[self.config.endpoint]
        async with aconnect_sse(client, "POST", path, json=self.body(spec)) as source:
            response = source.response
            result.status = response.status_code
            if response.status_code != 200:
                body = await response.aread()
                code, message = _error_message(body)
                result.kind = "http"
                result.message = f"HTTP {response.status_code} {code}: {message}"
                return
            async with contextlib.aclosing(source.aiter_sse()) as events:
                await self._read(events, spec, result)

    async def _read(
        self,
        events: AsyncIterator[ServerSentEvent],
        spec: RequestSpec,
        result: RequestResult,
    ) -> None:
        chat = self.config.endpoint == "chat"
        done = False
        chunks = 0
        usage_tokens: int | None = None
        last: float | None = None
        async for sse in events:
            data = sse.data
            if not data:  # an event of only id:, event: or retry: fields
                continue
            if data.strip() == "[DONE]":
                done = True
                break
            event = json.loads(data)
            if not isinstance(event, dict):
                raise ValueError(f"event is not an object: {data[:100]}")
            if event.get("error") or event.get("error_code"):
                code, message = _error_message(data.encode())
                result.kind, result.message = "error_event", f"{code}: {message}"
                return
            usage = event.get("usage")
            if isinstance(usage, dict) and usage.get("completion_tokens"):
                usage_tokens = int(usage["completion_tokens"])
                result.prompt_tokens = usage.get("prompt_tokens")
            for choice in event.get("choices") or ():
                if chat:
                    text = (choice.get("delta") or {}).get("content")
                else:
                    text = choice.get("text")
                if text:
                    now = self.now()
                    if result.first_token is None:
                        result.first_token = now
                    else:
                        result.itl.append(now - last)
                    last = now
                    chunks += 1
                if choice.get("finish_reason"):
                    result.finish_reason = choice["finish_reason"]
        if not done:
            result.kind = "incomplete"
            result.message = "the stream ended without [DONE]"
            return
        if usage_tokens is not None:
            result.output_tokens = usage_tokens
        elif result.finish_reason == "length":
            # Servers without streamed usage (FastChat): a length stop means
            # exactly max_tokens, while chunks may carry several tokens.
            result.output_tokens = spec.max_tokens
        else:
            result.output_tokens = chunks


async def discover_model(
    base_url: str, api_key: str | None = None, timeout: float = 10.0
) -> str:
    """The first model the server lists (GET /models)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(timeout=timeout, trust_env=False) as client:
        reply = await client.get(base_url.rstrip("/") + "/models", headers=headers)
        reply.raise_for_status()
        models = reply.json().get("data") or []
    if not models:
        raise ValueError(f"{base_url} lists no models")
    return str(models[0]["id"])
