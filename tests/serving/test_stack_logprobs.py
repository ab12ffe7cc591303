"""Logprobs through the real stack against the engine's own, computed in process.

A chat completion (`logprobs`, `top_logprobs=3`) and an echoed completion
(`logprobs=3`) go through `qwen-vllm serve` with the official openai client.
The reference is an independent `vllm.LLM` on the same checkpoint with the
stack's engine settings (read from its command line), fed the same prompt
token ids (the chat rendered by the product's ChatML module as the worker
renders it, the completion prompt encoded as the worker encodes it; both
checked against usage.prompt_tokens).

Tolerance: the same tokens, in the same order, and logprobs within 1e-4 nats.
Both sides run one computation: the same kernels, weights, dtype and compile
mode on the same prompt ids, each request in a batch of one, prompts shorter
than one KV block (so a prefix cached by earlier requests cannot change the
path). Measured: bitwise equal, for the chosen and the top-3 logprobs of both
requests. 1e-4 leaves room for fp32 accumulation done in another order (about
1e-6 relative on values below 30 nats), not for one bf16 step of a logit
(2**-8 |z|, 0.01 to 0.1 nats on this checkpoint): that would mean the stack
ran something else (another dtype, batch, position or sampling) than the
engine does for the request.

With echo the response lists the prompt's tokens first, as OpenAI and vLLM
do, the first with a null logprob (what lm-evaluation-harness reads to score a
prompt): the last test checks them against the engine's prompt logprobs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import openai
import pytest

from qwen_vllm.chat.chatml import build_prompt_ids
from qwen_vllm.chat.vocab import STOP_TOKEN_IDS
from qwen_vllm.serving.settings import WorkerSettings

pytestmark = pytest.mark.slow

TOP = 3
MAX_TOKENS = 8
TOLERANCE = 1e-4
MESSAGES = [{"role": "user", "content": "Write a haiku about the sea."}]
PROMPT = "The quick brown fox"


@dataclasses.dataclass(frozen=True)
class Position:
    token: str
    logprob: float
    top: list[tuple[str, float]]  # by rank, best first


@dataclasses.dataclass(frozen=True)
class Expected:
    prompt_ids: list[int]
    text: str
    positions: list[Position]
    prompt_positions: list[Position]  # of prompt_ids[1:]


def stack_engine_args(stack) -> dict[str, Any]:
    """The engine arguments `qwen-vllm serve` gives the stack's workers."""
    command = stack.command()
    defaults = WorkerSettings.model_fields

    def flag(name: str, field: str) -> Any:
        if name in command:
            return command[command.index(name) + 1]
        return defaults[field].default

    args = {
        "dtype": flag("--dtype", "dtype"),
        "kv_cache_dtype": flag("--kv-cache-dtype", "kv_cache_dtype"),
        "enforce_eager": "--enforce-eager" in command,
    }
    max_model_len = flag("--max-model-len", "max_model_len")
    if max_model_len is not None:
        args["max_model_len"] = int(max_model_len)
    return args


def positions(token_ids, logprobs) -> list[Position]:
    result = []
    for token_id, candidates in zip(token_ids, logprobs, strict=True):
        ranked = sorted(
            (c for c in candidates.values() if c.rank <= TOP), key=lambda c: c.rank
        )
        chosen = candidates[token_id]
        result.append(
            Position(
                chosen.decoded_token,
                chosen.logprob,
                [(c.decoded_token, c.logprob) for c in ranked],
            )
        )
    return result


@pytest.fixture(scope="module")
def expected(stack) -> dict[str, Expected]:
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=str(stack.model_dir),
        **stack_engine_args(stack),
    )
    try:
        tokenizer = llm.get_tokenizer()
        prompts = {
            "chat": build_prompt_ids(MESSAGES, tokenizer.encode_plain),
            "completion": tokenizer.encode(PROMPT, add_special_tokens=False),
        }
        # No full block, so no prefix of these prompts is ever served from cache.
        block = llm.llm_engine.vllm_config.cache_config.block_size
        assert max(len(ids) for ids in prompts.values()) < block
        params = SamplingParams(
            temperature=0,
            max_tokens=MAX_TOKENS,
            logprobs=TOP,
            prompt_logprobs=TOP,
            stop_token_ids=list(STOP_TOKEN_IDS),
            skip_special_tokens=True,
        )
        outputs = {
            # One request at a time, as the stack serves them here.
            name: llm.generate([{"prompt_token_ids": ids}], params)[0]
            for name, ids in prompts.items()
        }
    finally:
        llm.llm_engine.engine_core.shutdown()
    return {
        name: Expected(
            prompt_ids=prompts[name],
            text=out.outputs[0].text,
            positions=positions(out.outputs[0].token_ids, out.outputs[0].logprobs),
            prompt_positions=positions(
                out.prompt_token_ids[1:], out.prompt_logprobs[1:]
            ),
        )
        for name, out in outputs.items()
    }


@pytest.fixture(scope="module")
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{stack.gateway}/v1", api_key=stack.api_key, max_retries=0
    )


def worst(pairs) -> float:
    return max((abs(a - b) for a, b in pairs), default=0.0)


def test_chat_logprobs_are_the_engines(stack, client, expected):
    want = expected["chat"]
    reply = client.chat.completions.create(
        model=stack.model,
        messages=MESSAGES,
        max_tokens=MAX_TOKENS,
        temperature=0,
        logprobs=True,
        top_logprobs=TOP,
    )
    assert reply.usage.prompt_tokens == len(want.prompt_ids)
    assert reply.usage.completion_tokens == len(want.positions)
    choice = reply.choices[0]
    assert choice.message.content == want.text
    content = choice.logprobs.content
    assert [c.token for c in content] == [p.token for p in want.positions]
    for got, position in zip(content, want.positions, strict=True):
        assert got.bytes == list(got.token.encode())
        tops = got.top_logprobs
        assert len(tops) == TOP
        assert [t.token for t in tops] == [t for t, _ in position.top]
        values = [t.logprob for t in tops]
        assert values == sorted(values, reverse=True)
        # Greedy: the chosen token is (one of) the most likely.
        assert got.logprob == tops[0].logprob
        assert all(t.bytes == list(t.token.encode()) for t in tops)
    chosen = worst(
        (c.logprob, p.logprob) for c, p in zip(content, want.positions, strict=True)
    )
    top = worst(
        (t.logprob, lp)
        for c, p in zip(content, want.positions, strict=True)
        for t, (_, lp) in zip(c.top_logprobs, p.top, strict=True)
    )
    print(f"\nchat: |stack - engine| chosen {chosen:.3g}, top-{TOP} {top:.3g}")
    assert chosen <= TOLERANCE
    assert top <= TOLERANCE


@pytest.fixture(scope="module")
def echoed(stack, client):
    """One echoed completion with logprobs, checked by the two tests below."""
    return client.completions.create(
        model=stack.model,
        prompt=PROMPT,
        max_tokens=MAX_TOKENS,
        temperature=0,
        logprobs=TOP,
        echo=True,
    )


def test_echoed_completion_logprobs_are_the_engines(echoed, expected):
    want = expected["completion"]
    reply = echoed
    assert reply.usage.prompt_tokens == len(want.prompt_ids)
    assert reply.usage.completion_tokens == len(want.positions)
    choice = reply.choices[0]
    assert choice.text == PROMPT + want.text
    logprobs = choice.logprobs
    # The echoed prompt's tokens come first (the next test checks them).
    generated = slice(len(want.prompt_ids), None)
    assert logprobs.tokens[generated] == [p.token for p in want.positions]
    offsets = [0]
    for token in logprobs.tokens[:-1]:
        offsets.append(offsets[-1] + len(token))
    assert logprobs.text_offset == offsets
    assert logprobs.text_offset[generated][0] == len(PROMPT)
    tops = logprobs.top_logprobs[generated]
    for top, position in zip(tops, want.positions, strict=True):
        assert list(top) == [t for t, _ in position.top]
    chosen = worst(
        zip(
            logprobs.token_logprobs[generated],
            (p.logprob for p in want.positions),
            strict=True,
        )
    )
    top = worst(
        (top[t], lp)
        for top, p in zip(tops, want.positions, strict=True)
        for t, lp in p.top
    )
    print(f"\ncompletion: |stack - engine| chosen {chosen:.3g}, top-{TOP} {top:.3g}")
    assert chosen <= TOLERANCE
    assert top <= TOLERANCE


def test_echo_lists_the_prompts_logprobs_as_openai_does(echoed, expected):
    want = expected["completion"]
    logprobs = echoed.choices[0].logprobs
    prompt_len = len(want.prompt_ids)
    assert len(logprobs.tokens) == prompt_len + len(want.positions)
    assert logprobs.token_logprobs[0] is None
    assert logprobs.text_offset[0] == 0
    assert "".join(logprobs.tokens[:prompt_len]) == PROMPT
    for got, position in zip(
        logprobs.token_logprobs[1:prompt_len], want.prompt_positions, strict=True
    ):
        assert math.isclose(got, position.logprob, abs_tol=TOLERANCE)
    assert logprobs.top_logprobs[0] is None
    # The top candidates and, as OpenAI adds it, the prompt's own token.
    for top, position in zip(
        logprobs.top_logprobs[1:prompt_len], want.prompt_positions, strict=True
    ):
        assert list(top)[:TOP] == [t for t, _ in position.top]
        assert math.isclose(top[position.token], position.logprob, abs_tol=TOLERANCE)
