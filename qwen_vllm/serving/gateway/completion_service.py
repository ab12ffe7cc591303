"""/v1/completions: raw prompts (one or a batch) to worker params and back.

Choice k*n + j is the j-th sample of prompt k, as OpenAI numbers them. The
worker echoes (FastChat's `echo`): the prompt's text in front of the output
and, with logprobs, the prompt's tokens in front of the output's, as OpenAI
lists them.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from qwen_vllm.serving.gateway.logprobs import (
    TokenLogprob,
    completion_logprobs,
    parse_logprobs,
)
from qwen_vllm.serving.gateway.openai_models import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
)
from qwen_vllm.serving.gateway.planning import (
    Plan,
    answer_format,
    check_limits,
    choice_params,
    constrained,
    sampling_fields,
    usable_context,
)
from qwen_vllm.serving.gateway.results import finish_reason
from qwen_vllm.serving.gateway.service import GenerationService
from qwen_vllm.serving.gateway.streaming import StreamState
from qwen_vllm.serving.protocol import GenerateChunk, GenerateParams, Usage


@dataclass(frozen=True)
class CompletionPlan(Plan):
    prompts: list[str]

    def prompt_of(self, choice: int) -> int:
        return choice * len(self.prompts) // len(self.params)


class CompletionService(
    GenerationService[CompletionRequest, CompletionPlan, CompletionResponse]
):
    prompt_param = "prompt"

    async def plan(self, request: CompletionRequest) -> CompletionPlan:
        check_limits(request, request.max_tokens, self.settings)
        await usable_context(self.backend, request.model, request.max_tokens)
        fields = sampling_fields(
            request, request.max_tokens, request.stop_list(), request.logprobs
        )
        # Always sent: FastChat's workers echo unless told not to.
        fields["echo"] = request.echo
        if (output := answer_format(request)) is not None:
            fields["structured_outputs"] = constrained(output)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        prompts = request.prompts()
        params: list[GenerateParams] = []
        for number, prompt in enumerate(prompts):
            base = GenerateParams(model=request.model, prompt=prompt, **fields)
            seed = None if request.seed is None else request.seed + number * request.n
            params += choice_params(base, f"{request_id}-{number}", request.n, seed)
        return CompletionPlan(
            request_id=request_id,
            params=params,
            top_logprobs=request.logprobs,
            prompts=prompts,
        )

    def response(
        self,
        request: CompletionRequest,
        plan: CompletionPlan,
        chunks: list[GenerateChunk],
        usage: Usage,
    ) -> CompletionResponse:
        choices = []
        for index, chunk in enumerate(chunks):
            logprobs = None
            if plan.top_logprobs is not None:
                logprobs = completion_logprobs(
                    parse_logprobs(chunk.logprobs), plan.top_logprobs, 0
                )
            choices.append(
                CompletionChoice(
                    index=index,
                    text=chunk.text,
                    logprobs=logprobs,
                    finish_reason=finish_reason(chunk),
                )
            )
        return CompletionResponse(
            id=plan.request_id, model=request.model, choices=choices, usage=usage
        )

    def stream_state(
        self, request: CompletionRequest, plan: CompletionPlan
    ) -> _CompletionStream:
        return _CompletionStream(request, plan, self.prompt_param)


class _CompletionStream(StreamState[CompletionRequest, CompletionPlan]):
    """A streamed completion: text pieces, the echoed prompt in the first."""

    object_name = "text_completion"

    def __init__(
        self, request: CompletionRequest, plan: CompletionPlan, prompt_param: str
    ) -> None:
        super().__init__(request, plan, prompt_param)
        self.text_offsets = [0] * len(self.finished)

    def output(self, text: str) -> dict[str, Any]:
        return {"text": text}

    def format_logprobs(
        self, index: int, entries: list[TokenLogprob], top: int
    ) -> dict[str, Any]:
        logprobs = completion_logprobs(entries, top, self.text_offsets[index])
        self.text_offsets[index] += sum(len(e.token) for e in entries)
        return logprobs

    def finish(self, index: int, chunk: GenerateChunk) -> list[str]:
        return [self.choice_event(index, self.output(""), finish=finish_reason(chunk))]
