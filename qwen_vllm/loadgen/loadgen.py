"""An async load generator for OpenAI-compatible streaming APIs.

It keeps a fixed number of clients busy, each streaming one request after
another (chat or completions, Server-Sent Events), until a request count or a
time bound is reached. Prompt and output lengths are drawn from a seeded
distribution, so two servers measured with the same seed see the same
sequence of requests. Per request it records the time to first token, the
gaps between tokens and the output tokens; failures are classified by kind so
a fault-injection run can tell a clean error from a hang.

Soak mode is the same loop bounded by time, sampling the memory and open file
descriptors of chosen processes every few seconds (see procs.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import httpx

from qwen_vllm.loadgen.procs import PidSource, sample

Endpoint = Literal["chat", "completions"]
ENDPOINT_PATHS = {"chat": "/chat/completions", "completions": "/completions"}

# Failure kinds that end a request promptly with a diagnosis: an HTTP error, an
# error event in the stream, a refused or dropped connection. A timeout means
# the server went silent: in a fault-injection run that is a hang.
CLEAN_FAILURES = frozenset({"http", "error_event", "connect", "disconnected"})
HUNG = "timeout"

# Common English words: in Qwen's BPE each, with its leading space, is one
# token, so a prompt of n words is about n tokens on every server.
_WORD_TEXT = (
    "the of and to in is was for on that with as by at from his her they be "
    "this which have or one had not but what all were when we there can an "
    "your more if has will so no time would other into its then two like "
    "about these many some could see first been people water day long made "
    "over did down only way find use may new work part take get place live "
    "back give most very after thing our just name good great through where "
    "much before line right too mean old any same tell boy follow came want "
    "show also around form three small set put end does another well large "
    "must big even such because turn here why ask went men read need land "
    "different home us move try kind hand picture again change off play "
    "spell air away animal house point page letter mother answer found study "
    "still learn should world high every near add food between own below "
    "country plant last school father keep tree never start city earth eye "
    "light thought head under story saw left few while along might close "
    "something seem next hard open example begin life always those both paper "
    "together got group often run important until children side feet car mile "
    "night walk white sea began grow took river four carry state once book hear"
)
_WORDS = _WORD_TEXT.split()


@dataclass(frozen=True)
class LengthRange:
    """Token counts drawn log-uniformly from [low, high]: short ones dominate,
    as in real traffic, while long ones still occur."""

    low: int
    high: int

    @classmethod
    def parse(cls, text: str) -> LengthRange:
        low, _, high = text.partition("-")
        try:
            result = cls(int(low), int(high or low))
        except ValueError:
            raise ValueError(f"expected N or LOW-HIGH, got {text!r}") from None
        if not 1 <= result.low <= result.high:
            raise ValueError(f"need 1 <= LOW <= HIGH, got {text!r}")
        return result

    def draw(self, rng: random.Random) -> int:
        if self.low == self.high:
            return self.low
        value = math.exp(rng.uniform(math.log(self.low), math.log(self.high + 1)))
        return min(self.high, max(self.low, int(value)))

    def __str__(self) -> str:
        return f"{self.low}-{self.high}"


@dataclass(frozen=True)
class RequestSpec:
    index: int
    prompt: str
    prompt_words: int
    max_tokens: int


def request_specs(
    count: int, prompt: LengthRange, output: LengthRange, seed: int
) -> list[RequestSpec]:
    """The request sequence of one seed (the same for every server measured)."""
    rng = random.Random(seed)
    specs = []
    for index in range(count):
        words = prompt.draw(rng)
        text = " ".join(rng.choice(_WORDS) for _ in range(words))
        specs.append(RequestSpec(index, text, words, output.draw(rng)))
    return specs


@dataclass
class LoadConfig:
    base_url: str  # the API root, e.g. http://127.0.0.1:8000/v1
    model: str
    api_key: str | None = None
    endpoint: Endpoint = "chat"
    concurrency: int = 8
    num_requests: int = 100
    max_duration: float = 600.0  # no request starts after this many seconds
    prompt_tokens: LengthRange = field(default_factory=lambda: LengthRange(16, 256))
    output_tokens: LengthRange = field(default_factory=lambda: LengthRange(16, 128))
    seed: int = 0
    temperature: float = 0.0
    request_timeout: float = 300.0  # whole request, first byte to [DONE]
    stall_timeout: float = 60.0  # longest silence inside a stream
    connect_timeout: float = 5.0
    error_backoff: float = 0.1  # a client's pause after a failed request
    extra_body: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["prompt_tokens"] = str(self.prompt_tokens)
        data["output_tokens"] = str(self.output_tokens)
        data.pop("api_key")
        return data


@dataclass
class RequestResult:
    """One request; times are seconds since the start of the run."""

    index: int
    start: float
    end: float = 0.0
    ok: bool = False
    kind: str | None = None  # failure kind, see CLEAN_FAILURES and HUNG
    message: str | None = None
    status: int | None = None
    first_token: float | None = None
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int | None = None
    max_tokens: int = 0
    finish_reason: str | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.start

    @property
    def tpot(self) -> float | None:
        if self.first_token is None or self.output_tokens < 2:
            return None
        last = self.first_token + sum(self.itl)
        return (last - self.first_token) / (self.output_tokens - 1)

    @property
    def latency(self) -> float:
        return self.end - self.start

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ttft"] = self.ttft
        data["tpot"] = self.tpot
        return data


@dataclass
class Progress:
    done: int
    failed: int
    in_flight: int
    output_tokens: int
    elapsed: float
    ttft_p50: float | None

    def line(self, total: int | None) -> str:
        """total None: a time-bound run (soak), whose count is no goal."""
        rate = self.output_tokens / self.elapsed if self.elapsed > 0 else 0.0
        ttft = "-" if self.ttft_p50 is None else f"{self.ttft_p50 * 1000:.0f} ms"
        done = f"{self.done}" if total is None else f"{self.done}/{total}"
        return (
            f"{done} done, {self.in_flight} in flight, "
            f"{self.failed} failed, {rate:.1f} tok/s, TTFT p50 {ttft}, "
            f"{self.elapsed:.0f} s"
        )


@dataclass
class WatchSample:
    t: float
    label: str
    pid: int | None
    rss_bytes: int | None
    open_fds: int | None


@dataclass
class RunResult:
    config: LoadConfig
    started_at: str
    duration: float
    requests: list[RequestResult]
    samples: list[WatchSample] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        summary = summarize(self.requests, self.duration)
        if self.samples:
            summary["processes"] = summarize_samples(self.samples)
        return summary

    def to_dict(self, *, include_requests: bool = True) -> dict[str, Any]:
        data: dict[str, Any] = {
            "config": self.config.to_dict(),
            "started_at": self.started_at,
            "duration_s": self.duration,
            "summary": self.summary(),
        }
        if include_requests:
            data["requests"] = [r.to_dict() for r in self.requests]
        if self.samples:
            data["samples"] = [asdict(s) for s in self.samples]
        return data


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    """p50/p90/p99 (linear interpolation, as numpy's default) and the mean."""
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None, "max": None}
    ordered = sorted(values)

    def at(q: float) -> float:
        position = (len(ordered) - 1) * q / 100
        below = math.floor(position)
        above = min(below + 1, len(ordered) - 1)
        weight = position - below
        return ordered[below] * (1 - weight) + ordered[above] * weight

    return {
        "p50": at(50),
        "p90": at(90),
        "p99": at(99),
        "mean": sum(ordered) / len(ordered),
        "max": ordered[-1],
    }


def summarize(results: Sequence[RequestResult], duration: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    tokens = sum(r.output_tokens for r in ok)
    errors = Counter(r.kind or "unknown" for r in results if not r.ok)
    return {
        "requests": {
            "sent": len(results),
            "succeeded": len(ok),
            "failed": len(results) - len(ok),
        },
        "duration_s": duration,
        "throughput": {
            "output_tokens": tokens,
            "output_tokens_per_s": tokens / duration if duration > 0 else 0.0,
            "requests_per_s": len(ok) / duration if duration > 0 else 0.0,
        },
        "ttft_s": percentiles([r.ttft for r in ok if r.ttft is not None]),
        "tpot_s": percentiles([r.tpot for r in ok if r.tpot is not None]),
        "itl_s": percentiles([gap for r in ok for gap in r.itl]),
        "latency_s": percentiles([r.latency for r in ok]),
        "errors": dict(sorted(errors.items())),
    }


def summarize_samples(samples: Sequence[WatchSample]) -> dict[str, Any]:
    """Per watched process: first, last and largest RSS and descriptor count."""
    out: dict[str, Any] = {}
    for label in dict.fromkeys(s.label for s in samples):
        seen = [s for s in samples if s.label == label and s.pid is not None]
        if not seen:
            out[label] = {"pids": [], "samples": 0}
            continue
        rss = [s.rss_bytes for s in seen if s.rss_bytes is not None]
        fds = [s.open_fds for s in seen if s.open_fds is not None]
        out[label] = {
            "pids": list(dict.fromkeys(s.pid for s in seen)),
            "samples": len(seen),
            "rss_mib": _start_end_max([b / 2**20 for b in rss]),
            "open_fds": _start_end_max(fds),
        }
    return out


def _start_end_max(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"start": None, "end": None, "max": None}
    return {"start": values[0], "end": values[-1], "max": max(values)}


async def sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The data of each Server-Sent Event (multi-line data joined by newlines)."""
    data: list[str] = []
    async for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data = []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    if data:
        yield "\n".join(data)


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
        # /proc scans and /health calls block: keep them off the event loop
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
        chat = self.config.endpoint == "chat"
        path = ENDPOINT_PATHS[self.config.endpoint]
        done = False
        chunks = 0
        usage_tokens: int | None = None
        last: float | None = None
        async with client.stream("POST", path, json=self.body(spec)) as response:
            result.status = response.status_code
            if response.status_code != 200:
                body = await response.aread()
                code, message = _error_message(body)
                result.kind = "http"
                result.message = f"HTTP {response.status_code} {code}: {message}"
                return
            async for data in sse_data(response.aiter_lines()):
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
