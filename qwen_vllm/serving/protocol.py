"""FastChat's wire protocol between controller, workers and front ends.

The field names are FastChat's, so its own controller, workers, API server and
web UI interoperate with ours. Fields FastChat does not know are extensions
that FastChat peers ignore. Pure Python: imported by every service.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from enum import IntEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# Workers stream JSON objects separated by NUL bytes.
STREAM_DELIMITER = b"\0"
# FastChat's conversation template for Qwen v1 chat models.
QWEN_CONV_TEMPLATE = "qwen-7b-chat"


# The engine carries a seed as a 64-bit int, signed or unsigned; a larger one
# fails inside vLLM's frontend.
SEED_MIN = -(2**63)
SEED_MAX = 2**64 - 1


class ErrorCode(IntEnum):
    """FastChat's error codes (fastchat.constants.ErrorCode), same values."""

    VALIDATION_TYPE_ERROR = 40001
    INVALID_AUTH_KEY = 40101
    INCORRECT_AUTH_KEY = 40102
    NO_PERMISSION = 40103
    INVALID_MODEL = 40301
    PARAM_OUT_OF_RANGE = 40302
    CONTEXT_OVERFLOW = 40303
    RATE_LIMIT = 42901
    QUOTA_EXCEEDED = 42902
    ENGINE_OVERLOADED = 42903
    INTERNAL_ERROR = 50001
    CUDA_OUT_OF_MEMORY = 50002
    GRADIO_REQUEST_ERROR = 50003
    GRADIO_STREAM_UNKNOWN_ERROR = 50004
    CONTROLLER_NO_WORKER = 50005
    CONTROLLER_WORKER_TIMEOUT = 50006


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")


class WorkerStatus(_Message):
    model_names: list[str]
    speed: int = 1
    queue_length: int = 0


class RegisterWorkerRequest(_Message):
    worker_name: str  # the worker's base URL
    check_heart_beat: bool = True
    worker_status: WorkerStatus | None = None
    multimodal: bool = False


class HeartbeatRequest(_Message):
    worker_name: str
    queue_length: int = 0


class ModelRequest(_Message):
    model: str


class WorkerAddressRequest(ModelRequest):
    # Extension: workers that just failed this request, to be avoided.
    exclude: list[str] = Field(default_factory=list)


class ChatMessage(_Message):
    role: str
    content: str


class GenerateParams(_Message):
    """Body of /worker_generate_stream and /worker_generate.

    FastChat sends a rendered `prompt`; our gateway and web UI send `messages`
    instead, which the worker renders to ChatML token ids itself, so that text
    a user typed can never become a control token.
    """

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    # Sampling fields left out (None) take the model's generation defaults
    # (its generation_config.json, as `vllm serve` does); FastChat's clients
    # always send them. top_k: 0 or -1 is off.
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    # None: the model's max_new_tokens, else whatever room the context leaves.
    max_new_tokens: int | None = None
    # Extension (Qwen's server, HF's max_length): prompt and answer together,
    # in tokens; used when max_new_tokens is not set.
    max_length: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    echo: bool = False
    logprobs: int | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    request_id: str | None = None
    # Tokens of chat history kept (`messages` only); None: the model's
    # max_window_size, leaving room for max_new_tokens.
    max_window_size: int | None = None
    # Leave the last (assistant) message open for the model to continue, as
    # ReAct tool results need ("...\nObservation: ...\nThought:").
    continue_final_message: bool = False
    # Extension: a constraint on the output, as the keyword arguments of
    # vLLM's StructuredOutputsParams (the gateway sends a "structural_tag"
    # built by qwen_vllm.chat.constraints).
    structured_outputs: dict[str, Any] | None = None
    use_beam_search: bool | None = None
    best_of: int | None = None

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatDefaults(BaseModel):
    """Extension of /model_details: the model's generation defaults for the
    settings a chat page shows (its sliders start there)."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int | None = None  # None: the rest of the context


class Usage(BaseModel):
    """FastChat's usage has OpenAI's field names: the gateway answers with it."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


FinishReason = Literal["stop", "length", "abort", "error"]


class TokenCandidate(BaseModel):
    token: str  # decoded text; "" for a piece of a UTF-8 character
    logprob: float
    bytes: list[int]  # the token's raw bytes


class Logprobs(_Message):
    """Logprobs of the tokens of `text`, in FastChat's completion-style shape.

    Position i is the token tokens[i] (its decoded text) with its logprob
    token_logprobs[i], the candidates for that position by text in
    top_logprobs[i] (the requested number, GenerateParams.logprobs, and may
    include the token itself) and where it starts in `text` in text_offset[i].
    With echo (a `prompt`, not `messages`) the prompt's tokens come first, as
    FastChat's own workers list them: the first one has no context, so its
    logprob and top_logprobs are None.

    Extensions, which FastChat's clients ignore:
    - `offset`: the position of the first listed token. Like `text`, the
      lists may cover everything so far (offset 0 every time) or, to save
      bandwidth, only the tokens since the previous chunk.
    - `token_bytes[i]`: the raw bytes of tokens[i].
    - `candidates[i]`: top_logprobs[i] as a list, best first, with raw bytes:
      distinct tokens with the same text (pieces of UTF-8 characters all
      decode to "") share one key in top_logprobs but are all here.
    """

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)
    offset: int = 0
    token_bytes: list[list[int]] | None = None
    candidates: list[list[TokenCandidate] | None] | None = None


class GenerateChunk(_Message):
    """One streamed state: `text` is the whole output so far (FastChat style)."""

    text: str = ""
    error_code: int = 0
    usage: Usage = Field(default_factory=Usage)
    finish_reason: FinishReason | None = None
    logprobs: Logprobs | None = None

    def encode(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode() + STREAM_DELIMITER


def error_chunk(code: ErrorCode, message: str) -> GenerateChunk:
    return GenerateChunk(text=message, error_code=int(code), finish_reason="error")


async def iter_stream_pieces(byte_chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The whole pieces of a NUL-delimited stream, without their delimiter.

    A stream cut short mid-piece yields its tail last, for the caller to
    reject if it is not a whole JSON object.
    """
    buffer = b""
    async for raw in byte_chunks:
        buffer += raw
        *pieces, buffer = buffer.split(STREAM_DELIMITER)
        for piece in pieces:
            if piece:
                yield piece
    if buffer.strip():
        yield buffer


async def iter_stream_chunks(byte_chunks: AsyncIterator[bytes]) -> AsyncIterator[dict]:
    """Decode a NUL-delimited JSON stream as FastChat workers produce it."""
    async for piece in iter_stream_pieces(byte_chunks):
        yield json.loads(piece)


def validation_problems(
    errors: Iterable[Mapping], label: Callable[[str], str] = str
) -> str:
    """ "field: message; ..." for pydantic's errors; label renders a field path."""
    return "; ".join(
        "{}: {}".format(
            label(
                ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "body"
            ),
            error.get("msg", "invalid"),
        )
        for error in errors
    )
