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

from qwen_vllm.serving.gateway.generation import (
    StreamingService,
    StreamState,
    UsageCounter,
    check_context,
    check_limits,
    choice_params,
    completion_logprobs,
    context_length,
    failure,
    finish_reason,
    generate_all,
    parse_logprobs,
    sampling_fields,
    worker_failed,
)
from qwen_vllm.serving.gateway.openai_models import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
)
from qwen_vllm.serving.protocol import GenerateChunk, GenerateParams

PROMPT_PARAM = "prompt"


@dataclass(frozen=True)
class CompletionPlan:
    request_id: str
    prompts: list[str]
    params: list[GenerateParams]  # choice order

    def prompt_of(self, choice: int) -> int:
        return choice * len(self.prompts) // len(self.params)


class CompletionService(StreamingService):
    prompt_param = PROMPT_PARAM

    async def plan(self, request: CompletionRequest) -> CompletionPlan:
        check_limits(request, request.max_tokens, self.settings)
        check_context(
            request.max_tokens, await context_length(self.backend, request.model)
        )
        fields = sampling_fields(request, request.max_tokens)
        # Always sent: FastChat's workers echo unless told not to.
        fields["echo"] = request.echo
        if request.stop:
            fields["stop"] = request.stop_list()
        if request.logprobs is not None:
            fields["logprobs"] = request.logprobs
        request_id = f"cmpl-{uuid.uuid4().hex}"
        prompts = request.prompts()
        params: list[GenerateParams] = []
        for number, prompt in enumerate(prompts):
            base = GenerateParams(model=request.model, prompt=prompt, **fields)
            seed = None if request.seed is None else request.seed + number * request.n
            params += choice_params(base, f"{request_id}-{number}", request.n, seed)
        return CompletionPlan(request_id, prompts, params)

    async def complete(self, request: CompletionRequest) -> CompletionResponse:
        plan = await self.plan(request)
        chunks = await generate_all(self.backend, request.model, plan.params)
        usage = UsageCounter()
        choices = []
        for index, chunk in enumerate(chunks):
            if worker_failed(chunk):
                raise failure(chunk, PROMPT_PARAM)
            usage.record(index, plan.prompt_of(index), chunk)
            logprobs = None
            if request.logprobs is not None:
                logprobs = completion_logprobs(
                    parse_logprobs(chunk.logprobs), request.logprobs, 0
                )
            choices.append(
                CompletionChoice(
                    index=index,
                    text=chunk.text,
                    logprobs=logprobs,
                    finish_reason=finish_reason(chunk),
                )
            )
        total = usage.usage()
        self.metrics.count_tokens(
            request.model, total.prompt_tokens, total.completion_tokens
        )
        return CompletionResponse(
            id=plan.request_id, model=request.model, choices=choices, usage=total
        )

    def stream_state(self, request, plan) -> _CompletionStream:
        return _CompletionStream(request, plan)


class _CompletionStream(StreamState):
    """A streamed completion: text pieces, the echoed prompt in the first."""

    object_name = "text_completion"
    prompt_param = PROMPT_PARAM

    def __init__(self, request: CompletionRequest, plan: CompletionPlan) -> None:
        super().__init__(request, plan)
        self.text_offsets = [0] * len(self.finished)

    def piece(
        self,
        index: int,
        text: str = "",
        *,
        logprobs: dict[str, Any] | None = None,
        finish: str | None = None,
    ) -> str:
        return self.event(
            index, {"text": text, "logprobs": logprobs, "finish_reason": finish}
        )

    def progress(self, index: int, chunk: GenerateChunk) -> list[str]:
        tracker = self.trackers[index]
        text = tracker.delta(chunk)
        logprobs = None
        top = self.request.logprobs
        if top is not None:
            fresh = tracker.new_logprobs(chunk)
            if fresh:
                logprobs = completion_logprobs(fresh, top, self.text_offsets[index])
                self.text_offsets[index] += sum(len(e.token) for e in fresh)
        if not text and logprobs is None:
            return []
        return [self.piece(index, text, logprobs=logprobs)]

    def finish(self, index: int, chunk: GenerateChunk) -> list[str]:
        self.usage.record(index, self.plan.prompt_of(index), chunk)
        return [self.piece(index, finish=finish_reason(chunk))]
