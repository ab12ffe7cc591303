"""The GPU path: bf16, CUDA graphs, tensor parallelism, GPTQ and fp8 KV caches.

Run on a machine with a CUDA GPU and the official vllm wheel
(`pytest -m gpu`); elsewhere every test skips with NEEDS_GPU. Each engine run
is checked against the float64 reference along the engine's own greedy path
(teacher forcing), so one near-tie cannot derail a whole horizon, and two
engines are compared token by token up to the first step where the reference
sees a near-tie, beyond which rounding may legitimately pick either token.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

import pytest

from qwen_vllm.checkpoints.demo import DemoModelSpec, write_demo_model
from tests.gptq_checkpoint import dequantized_weights, write_gptq_checkpoint
from tests.reference_qwen import ReferenceQwenV1

NEEDS_GPU = "needs a CUDA GPU"


def cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(cuda_devices() < 1, reason=NEEDS_GPU),
]

STEPS = 16
LENGTHS = [7, 32, 96, 250]
# Tolerances in nats on a chosen token's log-probability. bf16 keeps 8
# significant bits: the demo's top logits (about 20) are rounded by up to
# 0.06, and a float64 simulation of this model with every activation rounded
# to bf16 moves chosen log-probabilities by at most 0.1; 0.25 leaves room for
# kernels' own rounding. float16 keeps 11 bits. An fp8 e4m3 cache (4
# significant bits per K and V value) added at most 0.19 in that simulation.
TOL_BF16 = 0.25
TOL_FP16 = 0.1
TOL_FP8 = 0.5
# A small share of the GPU, so these tests run beside other work.
GPU_MEMORY = 0.4


@dataclass
class Run:
    tokens: list[list[int]]
    logprobs: list[list[float]]
    config: object  # the engine's VllmConfig


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(1000, 100_000) for _ in range(n)] for n in LENGTHS]


def generate(path, prompts, **engine_kwargs) -> Run:
    from vllm import LLM, SamplingParams

    engine_kwargs.setdefault("dtype", "bfloat16")
    engine_kwargs.setdefault("enforce_eager", True)
    llm = LLM(
        model=str(path),
        max_model_len=512,
        seed=0,
        gpu_memory_utilization=GPU_MEMORY,
        **engine_kwargs,
    )
    try:
        params = SamplingParams(
            temperature=0.0, max_tokens=STEPS, logprobs=0, ignore_eos=True
        )
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        config = llm.llm_engine.vllm_config
    finally:
        llm.llm_engine.engine_core.shutdown()
    tokens = [list(out.outputs[0].token_ids) for out in outputs]
    logprobs = [
        [lp[t].logprob for t, lp in zip(ids, out.outputs[0].logprobs, strict=True)]
        for ids, out in zip(tokens, outputs, strict=True)
    ]
    return Run(tokens, logprobs, config)


def along(reference: ReferenceQwenV1, prompt: list[int], tokens: list[int]):
    """[steps, vocab] reference log-probabilities at each step of a greedy path."""
    import torch

    logits = reference.logits(prompt + tokens)[len(prompt) - 1 : -1]
    return torch.log_softmax(logits, -1)


def assert_follows_reference(reference, prompts, run: Run, tol: float) -> None:
    """Every chosen token is the reference's best up to tol, with its logprob."""
    for prompt, tokens, logprobs in zip(prompts, run.tokens, run.logprobs, strict=True):
        assert len(tokens) == STEPS
        want = along(reference, prompt, tokens)
        for step, (token, logprob) in enumerate(zip(tokens, logprobs, strict=True)):
            here = float(want[step, token])
            behind = float(want[step].max()) - here
            where = f"{len(prompt)}-token prompt, step {step}, token {token}"
            assert behind <= tol, f"{where}: {behind:.3f} nats below the best"
            assert abs(logprob - here) <= tol, f"{where}: {logprob} vs {here}"


def sure_steps(logprobs, tokens: list[int], noise: float) -> int:
    """Steps of a path before the first one where another token is within noise
    of the chosen one: up to there, engines within noise/2 of the reference
    must choose alike."""
    for step, token in enumerate(tokens):
        others = logprobs[step].clone()
        others[token] = float("-inf")
        if float(logprobs[step, token] - others.max()) <= noise:
            return step
    return len(tokens)


def assert_same_tokens(reference, prompts, got: Run, base: Run, tol: float) -> None:
    for prompt, mine, theirs in zip(prompts, got.tokens, base.tokens, strict=True):
        sure = sure_steps(along(reference, prompt, theirs), theirs, 2 * tol)
        assert mine[:sure] == theirs[:sure], f"{len(prompt)}-token prompt"


@pytest.fixture(scope="module")
def reference(demo_dir) -> ReferenceQwenV1:
    return ReferenceQwenV1.from_dir(demo_dir)


@pytest.fixture(scope="module")
def eager(demo_dir, prompts) -> Run:
    return generate(demo_dir, prompts)


def test_bf16_greedy_tokens_follow_the_float64_reference(reference, prompts, eager):
    assert_follows_reference(reference, prompts, eager, TOL_BF16)
    for prompt, tokens in zip(prompts, eager.tokens, strict=True):
        want, _ = reference.greedy(prompt, STEPS)
        sure = sure_steps(along(reference, prompt, want), want, 2 * TOL_BF16)
        assert tokens[:sure] == want[:sure], f"{len(prompt)}-token prompt"


def test_cuda_graphs_give_the_eager_tokens(demo_dir, reference, prompts, eager):
    from vllm.config import CompilationMode, CUDAGraphMode

    compiled = generate(demo_dir, prompts, enforce_eager=False)
    compilation = compiled.config.compilation_config
    assert compilation.mode == CompilationMode.VLLM_COMPILE
    assert compilation.cudagraph_mode != CUDAGraphMode.NONE
    assert compilation.cudagraph_capture_sizes
    assert_follows_reference(reference, prompts, compiled, TOL_BF16)
    assert_same_tokens(reference, prompts, compiled, eager, TOL_BF16)


@pytest.mark.skipif(cuda_devices() < 2, reason=NEEDS_GPU)
def test_tensor_parallel_2_gives_the_tp1_tokens(demo_dir, reference, prompts, eager):
    tp2 = generate(demo_dir, prompts, tensor_parallel_size=2)
    assert tp2.config.parallel_config.tensor_parallel_size == 2
    assert_follows_reference(reference, prompts, tp2, TOL_BF16)
    assert_same_tokens(reference, prompts, tp2, eager, TOL_BF16)


def test_gptq_int4_follows_the_dequantized_reference(tmp_path_factory, prompts):
    root = tmp_path_factory.mktemp("gptq")
    spec = DemoModelSpec(hidden_size=128, num_attention_heads=4, intermediate_size=512)
    source = write_demo_model(root / "fp", spec)
    int4_dir = write_gptq_checkpoint(source, root / "Qwen-demo-Chat-Int4", bits=4)
    run = generate(int4_dir, prompts, dtype="float16")
    assert "gptq" in run.config.model_config.quantization
    config = json.loads((int4_dir / "config.json").read_text())
    reference = ReferenceQwenV1(config, dequantized_weights(int4_dir, bits=4))
    assert_follows_reference(reference, prompts, run, TOL_FP16)


def test_fp8_kv_cache_agrees_with_the_bf16_cache(demo_dir, reference, prompts, eager):
    fp8 = generate(demo_dir, prompts, kv_cache_dtype="fp8_e4m3")
    assert fp8.config.cache_config.cache_dtype == "fp8_e4m3"
    assert_follows_reference(reference, prompts, fp8, TOL_FP8)
    assert_same_tokens(reference, prompts, fp8, eager, TOL_FP8)
