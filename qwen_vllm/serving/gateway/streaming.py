"""Streamed responses: worker chunks of n choices to OpenAI's server-sent events.

Worker chunks carry `text` and may carry logprobs (protocol.Logprobs); both
may cover the whole output so far or only what is new since the previous
chunk, and with echo the logprobs start with the prompt's tokens.
"""

from __future__ import annotations

import json
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Generic

from qwen_vllm.serving.gateway.choice_streams import ChoiceStreams
from qwen_vllm.serving.gateway.logprobs import TokenLogprob, parse_logprobs
from qwen_vllm.serving.gateway.planning import PlanT, RequestT
from qwen_vllm.serving.gateway.results import UsageCounter, failure, worker_failed
from qwen_vllm.serving.protocol import GenerateChunk

logger = logging.getLogger(__name__)

DONE_EVENT = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


@dataclass(frozen=True)
class EventStream:
    """Server-sent events, and how to close their worker streams even if the
    events are never iterated."""

    events: AsyncIterator[str]
    close: Callable[[], Awaitable[None]]


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


class StreamState(ABC, Generic[RequestT, PlanT]):
    """One streamed response: each choice's text, usage and end, the envelope
    of every event. Subclasses say how a choice's output and logprobs look
    and which events open the response and end a choice (`object_name` is the
    OpenAI chunk type)."""

    object_name: ClassVar[str]

    def __init__(self, request: RequestT, plan: PlanT, prompt_param: str) -> None:
        self.request = request
        self.plan = plan
        self.prompt_param = prompt_param
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

    def choice_event(
        self,
        index: int,
        output: dict[str, Any],
        *,
        logprobs: dict[str, Any] | None = None,
        finish: str | None = None,
    ) -> str:
        """An event of one choice; `output` holds its API's output fields."""
        return self.event(
            index, {**output, "logprobs": logprobs, "finish_reason": finish}
        )

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
            for event in self._progress(index, chunk):
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

    def _progress(self, index: int, chunk: GenerateChunk) -> list[str]:
        tracker = self.trackers[index]
        text = self.visible_text(index, tracker.delta(chunk))
        logprobs = None
        top = self.plan.top_logprobs
        if top is not None:
            fresh = tracker.new_logprobs(chunk)
            if fresh:
                logprobs = self.format_logprobs(index, fresh, top)
        if not text and logprobs is None:
            return []
        return [self.choice_event(index, self.output(text), logprobs=logprobs)]

    def _end(self, index: int, chunk: GenerateChunk) -> list[str]:
        self.finished[index] = True
        self.usage.record(index, self.plan.prompt_of(index), chunk)
        return self.finish(index, chunk)

    def opening(self) -> list[str]:
        """Events before any generated text."""
        return []

    def visible_text(self, index: int, text: str) -> str:
        """What of a choice's new text the client sees now."""
        return text

    @abstractmethod
    def output(self, text: str) -> dict[str, Any]:
        """A choice's output fields for a piece of its text."""

    @abstractmethod
    def format_logprobs(
        self, index: int, entries: list[TokenLogprob], top: int
    ) -> dict[str, Any]:
        """A choice's new tokens in the API's logprobs shape."""

    @abstractmethod
    def finish(self, index: int, chunk: GenerateChunk) -> list[str]:
        """Events that end a choice, given its last chunk."""
