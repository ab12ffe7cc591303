"""The worker streams of one request's choices, read as one."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import anyio

from qwen_vllm.serving.client import Backend, BackendError
from qwen_vllm.serving.gateway.errors import APIError, from_backend
from qwen_vllm.serving.gateway.results import failure, worker_failed
from qwen_vllm.serving.protocol import GenerateChunk, GenerateParams

logger = logging.getLogger(__name__)

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
