"""From an OpenAI request to the worker requests that answer it, one per choice.

Checks that need no worker (limits, the model's context) fail here, before
any generation starts.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from qwen_vllm.chat.constraints import json_format, structural_tag
from qwen_vllm.chat.vocab import with_chatml_stops
from qwen_vllm.serving.client import Backend, BackendError
from qwen_vllm.serving.gateway.errors import bad_request, from_backend
from qwen_vllm.serving.gateway.openai_models import SamplingRequest
from qwen_vllm.serving.protocol import GenerateParams
from qwen_vllm.serving.settings import GatewaySettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """The worker requests of one API request, in choice order."""

    request_id: str
    params: list[GenerateParams]
    top_logprobs: int | None  # None: no logprobs

    def prompt_of(self, choice: int) -> int:
        """Which prompt a choice samples: usage counts each prompt once."""
        return 0


RequestT = TypeVar("RequestT", bound=SamplingRequest)
PlanT = TypeVar("PlanT", bound=Plan)


def sampling_fields(
    request: SamplingRequest,
    max_tokens: int | None,
    stop: list[str],
    logprobs: int | None,
) -> dict[str, Any]:
    """GenerateParams fields the client set; unset ones stay the worker's."""
    fields: dict[str, Any] = {
        "max_new_tokens": max_tokens,  # None: the model's default
        "stop_token_ids": with_chatml_stops(),
    }
    if max_tokens is None and request.max_length is not None:
        fields["max_length"] = request.max_length
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
    if stop:
        fields["stop"] = stop
    if logprobs is not None:
        fields["logprobs"] = logprobs
    return fields


def answer_format(request: SamplingRequest) -> dict[str, Any] | None:
    """The constraint response_format puts on the answer; None: free text."""
    response_format = request.response_format
    if response_format is None or response_format.type == "text":
        return None
    if response_format.json_schema is None:  # json_object
        return json_format()
    return json_format(response_format.json_schema.schema_)


def constrained(format: dict[str, Any]) -> dict[str, Any]:
    """GenerateParams.structured_outputs for an output format."""
    return {"structural_tag": structural_tag(format)}


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


async def usable_context(
    backend: Backend,
    model: str,
    max_tokens: int | None,
    max_param: str = "max_tokens",
) -> int | None:
    """The model's context length, checked to leave room for a prompt.

    Raises for unknown models or no workers; None if the workers cannot say.
    """
    context = await _context_length(backend, model)
    if max_tokens is not None and context is not None and max_tokens >= context:
        raise bad_request(
            f"{max_param} ({max_tokens}) leaves no room for the prompt: this "
            f"model's context length is {context} tokens.",
            max_param,
        )
    return context


async def _context_length(backend: Backend, model: str) -> int | None:
    try:
        details = await backend.model_details(model)
    except BackendError as exc:
        error = from_backend(exc)
        if error.status in (404, 503):
            raise error from exc
        logger.warning("No context length for %s: %s", model, exc)
        return None
    return details.context_length


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
