"""LoRA adapters through vLLM's engine against the reference on merged weights.

Three PEFT adapters on Qwen's target modules (c_attn, c_proj, w1, w2) with
different ranks, alphas, rsLoRA and file formats; the test merges each into
the base weights itself and runs the float64 reference on the result. One
batch mixes the base model and the three adapters: every request gets its own
model's greedy tokens and logprobs.
"""

from __future__ import annotations

import pytest

from tests.lora_adapters import AdapterSpec, merged, write_adapter
from tests.model.greedy import TEXTS, greedy
from tests.reference_qwen import ReferenceQwenV1, read_checkpoint

pytestmark = pytest.mark.slow

STEPS = 12
ADAPTERS = {
    "rank8": AdapterSpec(rank=8, alpha=16, seed=1),
    "rank4-rslora-bin": AdapterSpec(
        rank=4, alpha=8, rslora=True, seed=2, safetensors=False
    ),
    "rank16": AdapterSpec(rank=16, alpha=8, seed=3),
}


@pytest.fixture(scope="module")
def adapters(wide_dir, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("adapters")
    return {
        name: write_adapter(wide_dir, root / name, spec)
        for name, spec in ADAPTERS.items()
    }


@pytest.fixture(scope="module")
def prompts(wide_dir) -> list[list[int]]:
    from transformers import AutoTokenizer

    from qwen_vllm import plugin

    plugin.register()
    tokenizer = AutoTokenizer.from_pretrained(wide_dir)
    return [tokenizer.encode(text) for text in TEXTS[:3]]


@pytest.fixture(scope="module")
def expected(wide_dir, adapters, prompts) -> dict:
    """model name (None: the base) -> reference (tokens, logprobs) per prompt."""
    models = {None: ReferenceQwenV1(*read_checkpoint(wide_dir))}
    for name, path in adapters.items():
        models[name] = ReferenceQwenV1(*merged(wide_dir, path))
    return {
        name: [model.greedy(prompt, STEPS) for prompt in prompts]
        for name, model in models.items()
    }


def run(wide_dir, requests, adapters, **engine_kwargs):
    """Greedy (tokens, logprobs) for (prompt, adapter name or None) pairs, in
    one batch on one engine that holds every adapter."""
    from vllm import LLM
    from vllm.lora.request import LoRARequest

    llm = LLM(
        model=str(wide_dir),
        dtype="float32",
        max_model_len=512,
        seed=0,
        enforce_eager=True,
        enable_lora=True,
        max_loras=len(adapters),
        max_lora_rank=max(spec.rank for spec in ADAPTERS.values()),
        **engine_kwargs,
    )
    ids = {name: i + 1 for i, name in enumerate(adapters)}
    lora_requests = [
        None if name is None else LoRARequest(name, ids[name], str(adapters[name]))
        for _, name in requests
    ]
    generations = greedy(
        llm, [prompt for prompt, _ in requests], STEPS, lora_requests=lora_requests
    )
    return [(g.tokens, g.logprobs) for g in generations]


def test_adapters_change_the_answers(expected):
    # Otherwise the comparisons below could not tell an adapter from the base.
    for name in ADAPTERS:
        assert expected[name] != expected[None], name


def mixed_requests(prompts):
    return [
        (prompt, name)
        for prompt in prompts
        for name in [None, *ADAPTERS]  # the base beside every adapter
    ]


@pytest.fixture(scope="module")
def tp1(wide_dir, adapters, prompts):
    return run(wide_dir, mixed_requests(prompts), adapters)


def test_one_batch_of_base_and_three_adapters_gets_each_its_own_model(
    tp1, prompts, expected
):
    assert_each_its_own_model(mixed_requests(prompts), tp1, prompts, expected)


def test_tensor_parallel_2_gives_the_same_as_tp1(
    wide_dir, adapters, prompts, expected, tp1, monkeypatch
):
    # One core per rank: vLLM's CPU backend needs an explicit binding for TP.
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    requests = mixed_requests(prompts)
    tp2 = run(
        wide_dir,
        requests,
        adapters,
        tensor_parallel_size=2,
        distributed_executor_backend="mp",
    )
    assert [tokens for tokens, _ in tp2] == [tokens for tokens, _ in tp1]
    assert_each_its_own_model(requests, tp2, prompts, expected)


def assert_each_its_own_model(requests, results, prompts, expected):
    for (prompt, name), (tokens, logprobs) in zip(requests, results, strict=True):
        want_tokens, want_logprobs = expected[name][prompts.index(prompt)]
        who = f"{name or 'the base model'} on a {len(prompt)}-token prompt"
        assert tokens == want_tokens, who
        diff = max(abs(a - b) for a, b in zip(logprobs, want_logprobs, strict=True))
        assert diff < 1e-3, who


def test_a_lora_emb_adapter_merged_by_merge_lora_serves_as_the_reference(
    wide_dir, prompts, expected, tmp_path
):
    """Qwen's "LoRA (emb)" (modules_to_save: the embedding and LM head) cannot
    be served as an adapter; `qwen-vllm merge-lora` makes it a checkpoint."""
    from vllm import LLM

    from qwen_vllm.cli.commands import main

    spec = AdapterSpec(rank=8, alpha=16, seed=4, modules_to_save=("wte", "lm_head"))
    adapter = write_adapter(wide_dir, tmp_path / "emb-lora", spec)
    out = tmp_path / "merged"
    assert main(["merge-lora", str(wide_dir), str(adapter), str(out)]) == 0

    reference = ReferenceQwenV1(*merged(wide_dir, adapter))
    llm = LLM(
        model=str(out), dtype="float32", max_model_len=512, seed=0, enforce_eager=True
    )
    generations = greedy(llm, prompts, STEPS)
    for prompt, got, base in zip(prompts, generations, expected[None], strict=True):
        want_tokens, want_logprobs = reference.greedy(prompt, STEPS)
        assert want_tokens != base[0]  # else merging could not be told apart
        assert got.tokens == want_tokens
        diff = max(abs(a - b) for a, b in zip(got.logprobs, want_logprobs, strict=True))
        assert diff < 1e-3
