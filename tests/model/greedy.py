"""Greedy generations of a vLLM engine with the logprobs the tests compare."""

from __future__ import annotations

import dataclasses

# Prompts of 1 to 156 tokens, batched together: short, long, Chinese, code.
TEXTS = [
    "Hi",
    "The quick brown fox jumps over the lazy dog.",
    "通义千问是阿里云研发的大语言模型。请介绍一下你自己，并写一首关于秋天的短诗。",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n" * 6,
]


@dataclasses.dataclass(frozen=True)
class Generation:
    prompt: list[int]
    tokens: list[int]
    logprobs: list[float]  # of the chosen tokens
    prompt_logprobs: list[float]  # of prompt[1:]


def greedy(
    llm, prompts: list[list[int]], steps: int, lora_requests: list | None = None
) -> list[Generation]:
    """`steps` greedy tokens for every prompt, batched (each with its LoRA
    request, if given); shuts the engine down."""
    from vllm import SamplingParams

    params = SamplingParams(
        temperature=0.0,
        max_tokens=steps,
        logprobs=0,
        prompt_logprobs=0,
        ignore_eos=True,
        detokenize=False,
    )
    try:
        outputs = llm.generate(
            [{"prompt_token_ids": p} for p in prompts],
            params,
            lora_request=lora_requests,
        )
    finally:
        llm.llm_engine.engine_core.shutdown()
    generations = []
    for out in outputs:
        completion = out.outputs[0]
        tokens = list(completion.token_ids)
        prompt = list(out.prompt_token_ids)
        generations.append(
            Generation(
                prompt=prompt,
                tokens=tokens,
                logprobs=[
                    lp[t].logprob
                    for t, lp in zip(tokens, completion.logprobs, strict=True)
                ],
                prompt_logprobs=[
                    lp[t].logprob
                    for t, lp in zip(prompt[1:], out.prompt_logprobs[1:], strict=True)
                ],
            )
        )
    return generations
