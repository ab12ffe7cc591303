"""The web UI's chat logic, free of Gradio: history in, answer states out.

A conversation is a list of Turns. ChatSession turns the history and the
user's settings into one GenerateParams (role/content messages: the worker
renders ChatML and trims old turns to the window) and consumes the chunk
stream, yielding the growing answer. Every failure ends as an error on the
turn, never as an exception, so the page always gets a final state.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, replace

from qwen_vllm.chat.chatml import DEFAULT_SYSTEM
from qwen_vllm.serving.client import (
    Backend,
    BackendError,
    ControllerUnavailableError,
    NoWorkerError,
    UnknownModelError,
    WorkerError,
    WorkerTimeoutError,
)
from qwen_vllm.serving.protocol import (
    ChatDefaults,
    ChatMessage,
    ErrorCode,
    GenerateParams,
)

logger = logging.getLogger(__name__)


# Max tokens the page starts at for a model without a max_new_tokens default.
PAGE_MAX_NEW_TOKENS = 512


@dataclass(frozen=True)
class ChatOptions:
    """What the user chose in the page besides the conversation itself (the
    settings start at the model's ChatDefaults)."""

    model: str
    system: str = DEFAULT_SYSTEM
    temperature: float = ChatDefaults().temperature
    top_p: float = ChatDefaults().top_p
    max_new_tokens: int = PAGE_MAX_NEW_TOKENS


@dataclass(frozen=True)
class Turn:
    """One question and what became of it.

    Turns with an error or without answer text are shown but not sent back to
    the model as history.
    """

    user: str
    answer: str = ""
    error: str | None = None
    truncated: bool = False  # ended at the max-tokens limit

    @property
    def answered(self) -> bool:
        return self.error is None and bool(self.answer)


def build_params(
    history: Sequence[Turn], question: str, options: ChatOptions
) -> GenerateParams:
    """The request for answering `question` after `history` (the worker keeps
    the model's window of history, leaving room for max_new_tokens)."""
    messages = [ChatMessage(role="system", content=options.system or DEFAULT_SYSTEM)]
    for turn in history:
        if turn.answered:
            messages.append(ChatMessage(role="user", content=turn.user))
            messages.append(ChatMessage(role="assistant", content=turn.answer))
    messages.append(ChatMessage(role="user", content=question))
    return GenerateParams(
        model=options.model,
        messages=messages,
        temperature=options.temperature,
        top_p=options.top_p,
        max_new_tokens=options.max_new_tokens,
    )


class ChatSession:
    """Answers questions through a Backend (a ControllerClient or a fake)."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    async def models(self) -> list[str]:
        """The models the controller knows; raises BackendError."""
        return sorted(await self.backend.list_models())

    async def chat_defaults(self, model: str) -> ChatDefaults | None:
        """The model's generation defaults for the page's settings; None if
        its workers do not say (FastChat's) or cannot be reached."""
        try:
            details = await self.backend.model_details(model)
        except BackendError as exc:
            logger.warning("No defaults from %s: %r", model, exc)
            return None
        return details.chat_defaults

    async def answer(
        self, history: Sequence[Turn], question: str, options: ChatOptions
    ) -> AsyncIterator[Turn]:
        """The turn for `question` as it grows; the last state is final.

        Closing this iterator (the Stop button cancels the Gradio task, which
        closes it) closes the worker stream and so aborts the generation.
        """
        turn = Turn(user=question)
        if not options.model:
            yield replace(turn, error="No model is selected: pick one first.")
            return
        try:
            details = await self.backend.model_details(options.model)
            context = details.context_length
            if context is not None and options.max_new_tokens >= context:
                yield replace(
                    turn,
                    error=f"Max tokens ({options.max_new_tokens}) must be below "
                    f"the model's context length of {context} tokens.",
                )
                return
            params = build_params(history, question, options)
            stream = self.backend.generate_stream(options.model, params)
            async with aclosing(stream):
                async for chunk in stream:
                    if chunk.error_code:
                        yield replace(
                            turn,
                            error=describe_error_chunk(chunk.error_code, chunk.text),
                        )
                        return
                    turn = replace(
                        turn,
                        answer=chunk.text,
                        truncated=chunk.finish_reason == "length",
                    )
                    yield turn
        except BackendError as exc:
            logger.warning("No answer from %s: %r", options.model, exc)
            yield replace(turn, error=describe_backend_error(exc, options.model))
            return
        except Exception as exc:
            # The page must get a final state whatever broke.
            logger.exception("Unexpected failure answering with %s", options.model)
            yield replace(turn, error=f"Unexpected error: {exc!r}")
            return
        if not turn.answer:
            yield replace(turn, error="The model returned an empty answer.")


def describe_backend_error(exc: BackendError, model: str) -> str:
    if isinstance(exc, UnknownModelError):
        return (
            f"The model {model!r} is not served. Refresh the model list and "
            "pick another one."
        )
    if isinstance(exc, NoWorkerError):
        return f"No worker is serving {model!r} right now; try again shortly. ({exc})"
    if isinstance(exc, ControllerUnavailableError):
        return f"The controller cannot be reached; try again shortly. ({exc})"
    if isinstance(exc, WorkerTimeoutError):
        return f"The worker did not answer in time. ({exc})"
    if isinstance(exc, WorkerError):
        return f"The workers serving {model!r} failed. ({exc})"
    return f"The request failed: {exc}"


def describe_error_chunk(code: int, text: str) -> str:
    """A worker's error chunk (FastChat error codes) as a sentence for users."""
    if code == ErrorCode.CONTEXT_OVERFLOW:
        return (
            "The request is too long for this model: shorten the message, "
            f"lower Max tokens or clear the chat. ({text})"
        )
    if code == ErrorCode.PARAM_OUT_OF_RANGE:
        return f"A setting is out of range. ({text})"
    if code in (ErrorCode.CONTROLLER_WORKER_TIMEOUT, ErrorCode.INTERNAL_ERROR):
        return f"The worker failed while answering. ({text})"
    if code == ErrorCode.CUDA_OUT_OF_MEMORY:
        return f"The worker ran out of memory. ({text})"
    try:
        name = ErrorCode(code).name
    except ValueError:
        name = "error"
    return f"The worker reported an error ({name} {code}): {text}"
