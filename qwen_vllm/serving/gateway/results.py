"""What a worker's chunk means to the client: a failure, a finish reason, usage.

Whole and streamed responses read their chunks alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qwen_vllm.serving.gateway.errors import APIError, from_chunk
from qwen_vllm.serving.protocol import GenerateChunk, Usage


def finish_reason(chunk: GenerateChunk, call: str | None = None) -> str:
    """`call`: the reason when the output is a tool call ("tool_calls", or
    "function_call" for the legacy form). The token limit comes first, as
    OpenAI reports it: a call cut short may have arguments that do not parse."""
    if chunk.finish_reason == "length":
        return "length"
    return call or "stop"


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
