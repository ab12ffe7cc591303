"""Running worker generations for one API request: n choices, streams, limits.

Worker chunks may carry logprobs (protocol.Logprobs). Like `text`, their
lists may cover the whole output so far or only the tokens since the
previous chunk; with echo they start with the prompt's tokens. Workers that
send no `candidates` (FastChat's) get each candidate's bytes from its text.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio

from qwen_vllm.chat.vocab import STOP_TOKEN_IDS
from qwen_vllm.serving.client import Backend, BackendError
from qwen_vllm.serving.gateway.errors import (
    APIError,
    bad_request,
    from_backend,
    from_chunk,
)
from qwen_vllm.serving.gateway.metrics import GatewayMetrics
from qwen_vllm.serving.gateway.openai_models import SamplingRequest, Usage
from qwen_vllm.serving.protocol import (
    GenerateChunk,
    GenerateParams,
    Logprobs,
    TokenCandidate,
)
from qwen_vllm.serving.settings import GatewaySettings

logger = logging.getLogger(__name__)

DONE_EVENT = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float | None  # None: the prompt's first token
    bytes: list[int]
    top: tuple[TokenCandidate, ...]  # best first


def sampling_fields(request: SamplingRequest, max_tokens: int | None) -> dict[str, Any]:
    """GenerateParams fields the client set; unset ones stay the worker's."""
    fields: dict[str, Any] = {
        "max_new_tokens": max_tokens,  # None: the rest of the context
        "stop_token_ids": list(STOP_TOKEN_IDS),
    }
    for name in (
        "temperature",
        "top_p",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
    ):
        value = getattr(request, name)
        if value is not None:
            fields[name] = value
    if request.top_k is not None:
        fields["top_k"] = -1 if request.top_k == 0 else request.top_k
    return fields


def check_limits(
    request: SamplingRequest,
    max_tokens: int | None,
    settings: GatewaySettings,
    max_param: str = "max_tokens",
) -> None:
    if request.n > settings.max_n:
        raise bad_request(f"n must be at most {settings.max_n}.", "n")
    if max_tokens is not None and max_tokens > settings.max_tokens_limit:
        raise bad_request(
            f"{max_param} must be at most {settings.max_tokens_limit}.", max_param
        )


async def context_length(backend: Backend, model: str) -> int | None:
    """The model's context; raises for unknown models or no workers."""
    try:
        details = await backend.model_details(model)
    except BackendError as exc:
        error = from_backend(exc)
        if error.status in (404, 503):
            raise error from exc
        logger.warning("No context length for %s: %s", model, exc)
        return None
    return details.context_length


def check_context(
    max_tokens: int | None, context: int | None, max_param: str = "max_tokens"
) -> None:
    if max_tokens is not None and context is not None and max_tokens >= context:
        raise bad_request(
            f"{max_param} ({max_tokens}) leaves no room for the prompt: this "
            f"model's context length is {context} tokens.",
            max_param,
        )


def choice_params(
    base: GenerateParams, request_id: str, n: int, seed: int | None
) -> Iterator[GenerateParams]:
    """One worker request per choice, each with its own seed and id."""
    for index in range(n):
        update: dict[str, Any] = {"request_id": f"{request_id}-{index}"}
        if seed is not None:
            update["seed"] = seed + index
        params = base.model_copy(update=update)
        params.model_fields_set.update(update)
        yield params


async def generate_all(
    backend: Backend, model: str, params: Sequence[GenerateParams]
) -> list[GenerateChunk]:
    """Whole generations, concurrently; the first failure cancels the rest."""
    tasks = [asyncio.ensure_future(backend.generate(model, p)) for p in params]
    try:
        return list(await asyncio.gather(*tasks))
    except BackendError as exc:
        raise from_backend(exc) from exc
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class TextTracker:
    """Turns FastChat's whole-text-so-far chunks into deltas."""

    def __init__(self) -> None:
        self.text = ""
        self.tokens_seen = 0

    def delta(self, chunk: GenerateChunk) -> str:
        text = chunk.text
        # A trailing U+FFFD is half a character still being decoded.
        if chunk.finish_reason is None and text.endswith("\ufffd"):
            text = text.rstrip("\ufffd")
        if len(text) <= len(self.text):
            return ""
        if not text.startswith(self.text):
            logger.debug("Worker rewrote streamed text; keeping what was sent")
        delta = text[len(self.text) :]
        self.text = text
        return delta

    def new_logprobs(self, chunk: GenerateChunk) -> list[TokenLogprob]:
        entries = parse_logprobs(chunk.logprobs)
        offset = chunk.logprobs.offset if chunk.logprobs else 0
        fresh = [
            entry
            for position, entry in enumerate(entries, start=offset)
            if position >= self.tokens_seen
        ]
        self.tokens_seen = max(self.tokens_seen, offset + len(entries))
        return fresh


def parse_logprobs(raw: Logprobs | None) -> list[TokenLogprob]:
    if raw is None:
        return []
    entries = []
    for index, token in enumerate(raw.tokens):
        entries.append(
            TokenLogprob(
                token,
                _at(raw.token_logprobs, index),
                _at(raw.token_bytes, index) or list(token.encode()),
                tuple(_candidates(raw, index)),
            )
        )
    return entries


def _at(values: list[Any] | None, index: int) -> Any:
    return values[index] if values is not None and index < len(values) else None


def _candidates(raw: Logprobs, index: int) -> list[TokenCandidate]:
    listed = _at(raw.candidates, index)
    if listed is not None:
        return listed
    by_text = _at(raw.top_logprobs, index) or {}
    return [
        TokenCandidate(token=text, logprob=logprob, bytes=list(text.encode()))
        for text, logprob in sorted(by_text.items(), key=lambda item: -item[1])
    ]


def chat_logprobs(entries: Sequence[TokenLogprob], top: int) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": e.token,
                "logprob": e.logprob,
                "bytes": e.bytes,
                "top_logprobs": [c.model_dump() for c in e.top[:top]],
            }
            for e in entries
        ]
    }


def completion_logprobs(
    entries: Sequence[TokenLogprob], top: int, start_offset: int
) -> dict[str, Any]:
    offsets, position = [], start_offset
    for entry in entries:
        offsets.append(position)
        position += len(entry.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [_top_by_text(e, top) for e in entries],
        "text_offset": offsets,
    }


def _top_by_text(entry: TokenLogprob, top: int) -> dict[str, float] | None:
    """The `top` best candidates and, as OpenAI adds it, the token itself."""
    if not top or entry.logprob is None:
        return None
    by_text: dict[str, float] = {}
    for candidate in entry.top[:top]:  # a text shared by several keeps the best
        by_text.setdefault(candidate.token, candidate.logprob)
    by_text.setdefault(entry.token, entry.logprob)
    return by_text


def finish_reason(chunk: GenerateChunk) -> str:
    return "length" if chunk.finish_reason == "length" else "stop"


def worker_failed(chunk: GenerateChunk) -> bool:
    return bool(chunk.error_code) or chunk.finish_reason in ("error", "abort")


def failure(chunk: GenerateChunk, prompt_param: str) -> APIError:
    """The error behind a chunk for which worker_failed() is true."""
    if not chunk.error_code:  # aborted or failed without a code: text is output
        return APIError(502, "The worker aborted the generation.", code="worker_error")
    return from_chunk(chunk, prompt_param)


@dataclass
class UsageCounter:
    """Usage of n choices: each distinct prompt's tokens count once."""

    prompt_tokens: dict[int, int] = field(default_factory=dict)
    completion_tokens: dict[int, int] = field(default_factory=dict)

    def record(self, choice: int, prompt_group: int, chunk: GenerateChunk) -> None:
        self.prompt_tokens[prompt_group] = chunk.usage.prompt_tokens
        self.completion_tokens[choice] = chunk.usage.completion_tokens

    def usage(self) -> Usage:
        prompt = sum(self.prompt_tokens.values())
        completion = sum(self.completion_tokens.values())
        return Usage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
        )


@dataclass(frozen=True)
class EventStream:
    """Server-sent events, and how to close their worker streams even if the
    events are never iterated."""

    events: AsyncIterator[str]
    close: Callable[[], Awaitable[None]]


_DONE = object()
# Chunks buffered per choice before the worker stream is made to wait.
_BUFFERED_CHUNKS = 16


class ChoiceStreams:
    """The worker streams of one request's choices, read as one.

    open() waits for every stream's first chunk, so failures before any
    output (raised, or reported in a first chunk) become HTTP errors. Each
    stream is read by its own task from start to end. close() (idempotent)
    stops the readers, which closes every upstream stream and so aborts the
    worker requests.
    """

    def __init__(self, streams: list[AsyncIterator[GenerateChunk]]) -> None:
        self._streams = streams
        self._firsts: list[asyncio.Future[GenerateChunk]] = []
        self._queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue(
            _BUFFERED_CHUNKS * len(streams)
        )
        self._readers: list[asyncio.Task[None]] = []
        self._closed = False

    @classmethod
    async def open(
        cls,
        backend: Backend,
        model: str,
        params: Sequence[GenerateParams],
        prompt_param: str,
    ) -> ChoiceStreams:
        """Starts every stream; an error before any output raises APIError."""
        self = cls([backend.generate_stream(model, p) for p in params])
        loop = asyncio.get_running_loop()
        self._firsts = [loop.create_future() for _ in self._streams]
        self._readers = [
            asyncio.ensure_future(self._read(index, stream, first))
            for index, (stream, first) in enumerate(
                zip(self._streams, self._firsts, strict=True)
            )
        ]
        try:
            await asyncio.gather(*self._firsts)
        except BaseException as exc:
            await self.close()
            if isinstance(exc, BackendError):
                raise from_backend(exc) from exc
            raise
        for first in self._firsts:
            if worker_failed(first.result()):
                await self.close()
                raise failure(first.result(), prompt_param)
        return self

    async def chunks(self) -> AsyncIterator[tuple[int, GenerateChunk]]:
        """(choice index, chunk) pairs: every first chunk, then the rest."""
        for index, first in enumerate(self._firsts):
            yield index, first.result()
        running = len(self._readers)
        while running:
            index, item = await self._queue.get()
            if item is _DONE:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item

    async def _read(
        self,
        index: int,
        stream: AsyncIterator[GenerateChunk],
        first: asyncio.Future[GenerateChunk],
    ) -> None:
        try:
            try:
                chunk = await anext(stream)
            except StopAsyncIteration:
                raise APIError(
                    502,
                    "The worker closed the stream without output.",
                    code="worker_error",
                ) from None
            if first.cancelled():  # open() was given up
                return
            first.set_result(chunk)
            async for chunk in stream:
                await self._queue.put((index, chunk))
        except asyncio.CancelledError:
            first.cancel()
            raise
        except Exception as exc:
            if not first.done():
                first.set_exception(exc)
                return
            if not isinstance(exc, APIError | BackendError):
                logger.exception("Worker stream %d failed", index)
                exc = APIError(502, "The worker stream failed.", code="worker_error")
            elif isinstance(exc, BackendError):
                exc = from_backend(exc)
            await self._queue.put((index, exc))
        finally:
            if not self._closed and first.done() and not first.cancelled():
                await self._queue.put((index, _DONE))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Shielded: this runs while the response task is being cancelled.
        with anyio.CancelScope(shield=True):
            for reader in self._readers:
                reader.cancel()
            await asyncio.gather(*self._readers, return_exceptions=True)
            # Mark failures of streams nobody waited for as seen.
            await asyncio.gather(*self._firsts, return_exceptions=True)
            for stream in self._streams:
                with contextlib.suppress(Exception):
                    await stream.aclose()  # type: ignore[attr-defined]


class StreamState:
    """One streamed response: each choice's text, usage and end, the envelope
    of every event. Subclasses say what a choice's opening, progress and end
    events are (`object_name` is the OpenAI chunk type)."""

    object_name = ""
    prompt_param = "prompt"

    def __init__(self, request: Any, plan: Any) -> None:
        self.request = request
        self.plan = plan
        self.created = int(time.time())
        self.usage = UsageCounter()
        n = len(plan.params)
        self.trackers = [TextTracker() for _ in range(n)]
        self.finished = [False] * n

    def event(self, index: int | None, choice: dict[str, Any] | None = None) -> str:
        """One SSE event: a choice's fields, or (index None) the usage."""
        data: dict[str, Any] = {
            "id": self.plan.request_id,
            "object": self.object_name,
            "created": self.created,
            "model": self.request.model,
            "choices": [] if index is None else [{"index": index, **(choice or {})}],
        }
        if self.request.include_usage:
            data["usage"] = self.usage.usage().model_dump() if index is None else None
        return sse_event(data)

    async def events(self, streams: ChoiceStreams) -> AsyncIterator[str]:
        for event in self.opening():
            yield event
        last: dict[int, GenerateChunk] = {}
        async for index, chunk in streams.chunks():
            if self.finished[index]:
                continue
            if worker_failed(chunk):
                raise failure(chunk, self.prompt_param)
            last[index] = chunk
            for event in self.progress(index, chunk):
                yield event
            if chunk.finish_reason is not None:
                for event in self._end(index, chunk):
                    yield event
        for index, done in enumerate(self.finished):
            if not done:  # the worker ended its stream without a finish reason
                for event in self._end(index, last.get(index, GenerateChunk())):
                    yield event
        if self.request.include_usage:
            yield self.event(None)

    def _end(self, index: int, chunk: GenerateChunk) -> list[str]:
        self.finished[index] = True
        return self.finish(index, chunk)

    def opening(self) -> list[str]:
        """Events before any generated text."""
        return []

    def progress(self, index: int, chunk: GenerateChunk) -> list[str]:
        """Events for a choice's new chunk."""
        raise NotImplementedError

    def finish(self, index: int, chunk: GenerateChunk) -> list[str]:
        """Events that end a choice, given its last chunk."""
        raise NotImplementedError


class StreamingService:
    """What chat and completions share: the backend, limits, metrics, and the
    streamed response around a per-request stream state."""

    # The request field a failure of the prompt is reported against.
    prompt_param = "prompt"

    def __init__(
        self, backend: Backend, settings: GatewaySettings, metrics: GatewayMetrics
    ) -> None:
        self.backend = backend
        self.settings = settings
        self.metrics = metrics

    async def plan(self, request: Any) -> Any:
        raise NotImplementedError

    def stream_state(self, request: Any, plan: Any) -> StreamState:
        raise NotImplementedError

    async def stream(self, request: Any) -> EventStream:
        """Opens the worker streams (errors so far raise) and returns the SSE."""
        started = time.perf_counter()
        plan = await self.plan(request)
        streams = await ChoiceStreams.open(
            self.backend, request.model, plan.params, self.prompt_param
        )
        self.metrics.time_to_first_token.labels(request.model).observe(
            time.perf_counter() - started
        )
        return EventStream(self._sse(request, plan, streams), streams.close)

    async def _sse(
        self, request: Any, plan: Any, streams: ChoiceStreams
    ) -> AsyncIterator[str]:
        state = self.stream_state(request, plan)
        try:
            async for event in state.events(streams):
                yield event
        except APIError as exc:
            yield sse_event(exc.body())
        finally:
            await streams.close()
            total = state.usage.usage()
            self.metrics.count_tokens(
                request.model, total.prompt_tokens, total.completion_tokens
            )
        yield DONE_EVENT
