"""Dynamic NTK and logN against the formulas and the independent reference."""

from __future__ import annotations

import math
import random

import pytest
import torch

from qwen_vllm.checkpoints.demo import DemoModelSpec, write_demo_model
from tests.reference_qwen import ReferenceQwenV1
from tests.reference_qwen import ntk_alpha as reference_alpha

SEQ = 64
STEPS = 16
# 0.5x, 1.5x, 3x and 6x seq_length, batched with requests of other lengths.
LENGTHS = [32, 96, 192, 384, 7, 130]


def test_alpha_levels_follow_the_published_formula():
    from qwen_vllm.model.long_context import ntk_alpha, ntk_level

    for length in range(1, 40 * SEQ):
        assert ntk_alpha(ntk_level(length, SEQ)) == reference_alpha(length, SEQ), length
    assert [ntk_alpha(level) for level in range(5)] == [1, 3, 7, 15, 31]


def test_logn_scale_follows_the_published_formula():
    from qwen_vllm.model.long_context import LogNScaling

    scaling = LogNScaling(span=8 * SEQ, seq_length=SEQ)
    positions = torch.arange(8 * SEQ)
    scaled = scaling(positions, torch.ones(8 * SEQ, 2))
    for p in (0, SEQ - 2, SEQ - 1, SEQ, 5 * SEQ):
        expected = max(1.0, math.log(p + 1) / math.log(SEQ))
        assert scaled[p, 0].item() == pytest.approx(expected, rel=1e-6)


def test_prompt_positions_carry_the_level_in_a_constant_offset():
    from qwen_vllm.model.long_context import prompt_positions

    positions, offset = prompt_positions(3 * SEQ, span=512, seq_length=SEQ)
    assert offset == 2 * 512  # 3x seq_length: level 2 (alpha 7)
    assert positions.shape == (3, 3 * SEQ)
    assert torch.equal(positions[1], torch.arange(3 * SEQ) + offset)


def write_ntk_model(root, name: str, max_positions: int, seed: int):
    """A float32 demo checkpoint trained at SEQ positions, with both tricks on."""
    spec = DemoModelSpec(
        hidden_size=128,
        num_attention_heads=4,
        intermediate_size=256,
        seq_length=SEQ,
        max_position_embeddings=max_positions,
        use_dynamic_ntk=True,
        use_logn_attn=True,
        dtype="float32",
        seed=seed,
    )
    return write_demo_model(root.mktemp("models") / name, spec)


@pytest.fixture(scope="module")
def ntk_dir(tmp_path_factory):
    return write_ntk_model(tmp_path_factory, "ntk", max_positions=512, seed=11)


@pytest.mark.slow
def test_engine_matches_reference_past_the_training_length(ntk_dir):
    from vllm import LLM, SamplingParams

    rng = random.Random(0)
    prompts = [[rng.randrange(1000, 100_000) for _ in range(n)] for n in LENGTHS]
    # A small token budget splits the long prompts into chunks: the NTK level
    # must still come from the whole prompt.
    llm = LLM(
        model=str(ntk_dir),
        dtype="float32",
        enforce_eager=True,
        max_num_batched_tokens=64,
        max_num_seqs=8,
        seed=0,
    )
    try:
        engine_config = llm.llm_engine.vllm_config
        assert engine_config.model_config.max_model_len == 512
        assert engine_config.cache_config.enable_prefix_caching is False
        params = SamplingParams(
            temperature=0.0,
            max_tokens=STEPS,
            logprobs=0,
            ignore_eos=True,
            detokenize=False,
        )
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    finally:
        llm.llm_engine.engine_core.shutdown()

    reference = ReferenceQwenV1.from_dir(ntk_dir)
    plain = ReferenceQwenV1(
        {**reference.c, "use_dynamic_ntk": False, "use_logn_attn": False}, reference.w
    )
    for prompt, output in zip(prompts, outputs, strict=True):
        completion = output.outputs[0]
        tokens = list(completion.token_ids)
        expected, expected_logprobs = reference.greedy(prompt, STEPS)
        assert tokens == expected, f"{len(prompt)}-token prompt"
        logprobs = [
            lp[t].logprob for t, lp in zip(tokens, completion.logprobs, strict=True)
        ]
        diff = max(abs(a - b) for a, b in zip(logprobs, expected_logprobs, strict=True))
        assert diff < 1e-3, f"{len(prompt)}-token prompt"
        if len(prompt) > SEQ:
            # The check has teeth: without the tricks the answer differs.
            assert plain.greedy(prompt, STEPS)[0] != expected, f"{len(prompt)}"


# Declaring no more positions than it was trained at, as Qwen-1.8B declares
# 8192 and is stated for 32K: dynamic NTK reaches four times that.
SHORT = SEQ
REACH = 4 * SHORT


@pytest.fixture(scope="module")
def short_dir(tmp_path_factory):
    return write_ntk_model(tmp_path_factory, "short", max_positions=SHORT, seed=12)


def test_max_model_len_may_reach_past_max_positions_by_dynamic_ntk(short_dir):
    from vllm.engine.arg_utils import EngineArgs

    def max_model_len(asked: int | None) -> int:
        args = EngineArgs(model=str(short_dir), max_model_len=asked)
        return args.create_engine_config().model_config.max_model_len

    assert max_model_len(None) == SHORT  # the default is the checkpoint's
    assert max_model_len(REACH) == REACH
    with pytest.raises(Exception, match=f"model_max_length={REACH}"):
        max_model_len(REACH + 1)


@pytest.mark.slow
def test_engine_matches_reference_up_to_the_reach(short_dir):
    from vllm import LLM, SamplingParams

    rng = random.Random(1)
    # Levels 0, 1 and 2 (alpha 1, 3, 7), the longest ending at the reach.
    lengths = [40, 100, REACH - STEPS]
    prompts = [[rng.randrange(1000, 100_000) for _ in range(n)] for n in lengths]
    llm = LLM(
        model=str(short_dir),
        dtype="float32",
        enforce_eager=True,
        max_model_len=REACH,
        max_num_seqs=4,
        seed=0,
    )
    try:
        params = SamplingParams(
            temperature=0.0, max_tokens=STEPS, ignore_eos=True, detokenize=False
        )
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    finally:
        llm.llm_engine.engine_core.shutdown()
    reference = ReferenceQwenV1.from_dir(short_dir)
    for prompt, output in zip(prompts, outputs, strict=True):
        expected, _ = reference.greedy(prompt, STEPS)
        assert list(output.outputs[0].token_ids) == expected, f"{len(prompt)}"
