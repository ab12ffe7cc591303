"""The plugin inside vLLM's engine against the independent reference.

fp32 end to end: the same greedy tokens for 32 steps on prompts of several
lengths batched together, and every logprob (prompt and output) within 1e-3.
"""

from __future__ import annotations

import dataclasses
import os

import pytest

from qwen_vllm.checkpoints.demo import write_demo_model
from tests.conftest import WIDE_SPEC
from tests.model.greedy import TEXTS, greedy
from tests.reference_qwen import ReferenceQwenV1

pytestmark = pytest.mark.slow

STEPS = 32


@pytest.fixture(scope="module")
def prompts(wide_dir) -> list[list[int]]:
    from transformers import AutoTokenizer

    from qwen_vllm import plugin

    plugin.register()
    tokenizer = AutoTokenizer.from_pretrained(wide_dir)
    ids = [tokenizer.encode(text) for text in TEXTS]
    assert len({len(i) for i in ids}) == len(ids)
    return ids


@pytest.fixture(scope="module")
def expected(wide_dir, prompts):
    """Reference greedy tokens, their logprobs and the prompt logprobs."""
    import torch

    reference = ReferenceQwenV1.from_dir(wide_dir)
    results = []
    for prompt in prompts:
        tokens, logprobs = reference.greedy(prompt, STEPS)
        all_logprobs = torch.log_softmax(reference.logits(prompt), -1)
        prompt_logprobs = [float(all_logprobs[i, t]) for i, t in enumerate(prompt[1:])]
        results.append((tokens, logprobs, prompt_logprobs))
    return results


def run_engine(path, prompts, **engine_kwargs):
    """(tokens, logprobs, prompt logprobs) per prompt, as `expected` has them."""
    from vllm import LLM

    llm = LLM(
        model=str(path), dtype="float32", max_model_len=512, seed=0, **engine_kwargs
    )
    return [
        (g.tokens, g.logprobs, g.prompt_logprobs) for g in greedy(llm, prompts, STEPS)
    ]


@pytest.fixture(scope="module")
def tp1(wide_dir, prompts):
    return run_engine(wide_dir, prompts, enforce_eager=True)


def _assert_matches(results, expected):
    for got, want in zip(results, expected, strict=True):
        assert got[0] == want[0], (
            f"greedy tokens differ for a {len(got[2]) + 1}-token prompt"
        )
        assert len(got[0]) == STEPS
        for kind in (1, 2):
            diff = max(
                (abs(a - b) for a, b in zip(got[kind], want[kind], strict=True)),
                default=0.0,
            )
            assert len(got[kind]) == len(want[kind])
            assert diff < 1e-3


def test_greedy_tokens_and_logprobs_match_the_reference(tp1, expected):
    _assert_matches(tp1, expected)


def test_tensor_parallel_2_matches_tp1_on_a_sharded_bin_checkpoint(
    tmp_path_factory, tp1, prompts, expected, monkeypatch
):
    # The same weights (same seed) stored as sharded pytorch .bin files.
    spec = dataclasses.replace(WIDE_SPEC, weight_format="bin", num_shards=2)
    path = write_demo_model(tmp_path_factory.mktemp("models") / "wide-bin", spec)
    # One core per rank: vLLM's CPU backend needs an explicit binding for TP.
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    assert os.cpu_count() >= 2
    tp2 = run_engine(
        path,
        prompts,
        tensor_parallel_size=2,
        distributed_executor_backend="mp",
        enforce_eager=True,
    )
    assert [r[0] for r in tp2] == [r[0] for r in tp1]
    _assert_matches(tp2, expected)
