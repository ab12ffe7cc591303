"""GPTQ (-Int4/-Int8) checkpoints and quantized KV caches.

Loading is checked everywhere; generation needs a GPTQ kernel (a GPU, or a
CPU build with torch.ops._C.cpu_gemm_wna16) and fp8 KV caches need a GPU or an
AVX-512 CPU. Where the kernel is missing the user gets a plain error.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from qwen_vllm.checkpoints.demo import DemoModelSpec, write_demo_model
from qwen_vllm.model import hooks as arch
from qwen_vllm.model.sizes import TensorParallelMismatch
from tests.gptq_checkpoint import dequantized_weights, write_gptq_checkpoint
from tests.lora_adapters import AdapterSpec, merged_into, write_adapter
from tests.reference_qwen import ReferenceQwenV1

SPEC = DemoModelSpec(hidden_size=128, num_attention_heads=4, intermediate_size=512)


def gptq_kernel_available() -> bool:
    if torch.cuda.is_available():
        return True
    import vllm._custom_ops  # noqa: F401

    return hasattr(torch.ops._C, "cpu_gemm_wna16")


@pytest.fixture(scope="module")
def int4_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("gptq")
    source = write_demo_model(root / "fp", SPEC)
    return write_gptq_checkpoint(source, root / "Qwen-demo-Chat-Int4", bits=4)


def test_gptq_tensors_load_into_every_quantized_linear(load, int4_dir, monkeypatch):
    # Loading is independent of the kernel that later runs the weights.
    monkeypatch.setattr(arch, "_check_quantization_kernels", lambda config: None)
    model = load(int4_dir, dtype="float16")
    params = dict(model.named_parameters())
    checkpoint = load_file(int4_dir / "model.safetensors")
    ours, ckpt = "model.layers.1", "transformer.h.1"
    assert torch.equal(
        params[f"{ours}.self_attn.qkv_proj.qweight"],
        checkpoint[f"{ckpt}.attn.c_attn.qweight"],
    )
    assert torch.equal(
        params[f"{ours}.mlp.down_proj.scales"].float(),
        checkpoint[f"{ckpt}.mlp.c_proj.scales"].float(),
    )
    # The merged gate/up layer holds w2 then w1, packed along the output dim.
    gate_up = params[f"{ours}.mlp.gate_up_proj.qweight"]
    expected = torch.cat(
        [checkpoint[f"{ckpt}.mlp.w2.qweight"], checkpoint[f"{ckpt}.mlp.w1.qweight"]],
        dim=1,
    )
    assert torch.equal(gate_up, expected)
    assert torch.equal(
        params[f"{ours}.self_attn.qkv_proj.bias"].float(),
        checkpoint[f"{ckpt}.attn.c_attn.bias"].float(),
    )


@pytest.mark.skipif(gptq_kernel_available(), reason="this vLLM build runs GPTQ")
def test_without_a_gptq_kernel_the_error_says_so(int4_dir):
    from vllm import LLM

    with pytest.raises(Exception, match="no GPTQ kernel"):
        LLM(model=str(int4_dir), enforce_eager=True, max_model_len=256)


@pytest.mark.skipif(not gptq_kernel_available(), reason="needs a GPTQ kernel")
def test_a_qlora_adapter_on_int4_matches_the_dequantized_reference_merged(
    int4_dir, tmp_path
):
    """Qwen's Q-LoRA: an adapter trained on the -Int4 model, served on it."""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    # PEFT builds the adapter on the float model the Int4 one was made from.
    spec = AdapterSpec(rank=8, alpha=32, seed=5, std=0.1)
    adapter = write_adapter(int4_dir.parent / "fp", tmp_path / "qlora", spec)
    config = json.loads((int4_dir / "config.json").read_text())
    base = dequantized_weights(int4_dir, bits=4)
    prompt = list(range(1000, 1040))

    def top5(weights) -> dict[int, float]:
        logits = ReferenceQwenV1(config, weights).logits(prompt, last_only=True)[-1]
        logprobs = torch.log_softmax(logits, -1)
        return {int(i): float(logprobs[i]) for i in logprobs.topk(5).indices}

    want, untuned = top5(merged_into(base, adapter)), top5(base)
    # Else the adapter could not be told from the base at this tolerance.
    assert (
        want.keys() != untuned.keys()
        or max(abs(want[i] - untuned[i]) for i in want) > 0.2
    )

    llm = LLM(
        model=str(int4_dir),
        dtype="float16",
        enforce_eager=True,
        enable_lora=True,
        max_loras=1,
        max_lora_rank=spec.rank,
    )
    try:
        params = SamplingParams(temperature=0, max_tokens=1, logprobs=5)
        request = LoRARequest("qlora", 1, str(adapter))
        (output,) = llm.generate(
            [{"prompt_token_ids": prompt}], params, lora_request=request
        )
    finally:
        llm.llm_engine.engine_core.shutdown()
    (token,) = output.outputs[0].token_ids
    assert token == max(want, key=want.get)
    got = {i: p.logprob for i, p in output.outputs[0].logprobs[0].items() if i in want}
    assert got.keys() == want.keys()
    assert max(abs(got[i] - want[i]) for i in want) < 5e-2


def test_8_bit_gptq_on_cpu_is_refused_plainly(tmp_path, monkeypatch):
    from vllm.engine.arg_utils import EngineArgs
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("a CPU-only limitation")
    source = write_demo_model(tmp_path / "fp", SPEC)
    int8_dir = write_gptq_checkpoint(source, tmp_path / "Int8", bits=8)
    monkeypatch.setattr(torch.ops._C, "cpu_gemm_wna16", object(), raising=False)
    with pytest.raises(Exception, match="8-bit GPTQ checkpoint"):
        EngineArgs(model=str(int8_dir), max_model_len=256).create_engine_config()


# Groups of 64 over an MLP 192 wide: at TP 2 each rank would get 96 inputs of
# mlp.c_proj, one and a half groups.
UNSPLITTABLE = DemoModelSpec(
    hidden_size=128, num_attention_heads=4, intermediate_size=384
)
STRADDLING = (
    "tensor_parallel_size 2 splits the 192 inputs of the MLP's output projection "
    "(mlp.c_proj) into 96 per rank, not a multiple of the GPTQ group size 64; "
    "sizes that work for this checkpoint: 1"
)


@pytest.fixture(scope="module")
def unsplittable_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("gptq-groups")
    source = write_demo_model(root / "fp", UNSPLITTABLE)
    return write_gptq_checkpoint(source, root / "Int4-group64", bits=4, group=64)


def test_groups_straddling_ranks_are_refused_before_any_engine(unsplittable_dir):
    # `vllm serve`, LLM and the worker all build this config first.
    from vllm.engine.arg_utils import EngineArgs

    def config(tp: int):
        return EngineArgs(
            model=str(unsplittable_dir), max_model_len=256, tensor_parallel_size=tp
        ).create_engine_config()

    with pytest.raises(Exception, match=re.escape(STRADDLING)):
        config(2)
    assert config(1).parallel_config.tensor_parallel_size == 1


def test_the_worker_reports_the_refusal_as_itself(unsplittable_dir, monkeypatch):
    # Unwrapped from vLLM's ValidationError, so the supervisor does not retry.
    from vllm.v1.engine.async_llm import AsyncLLM

    from qwen_vllm.serving.settings import WorkerSettings
    from qwen_vllm.serving.worker.engine import VllmEngine

    def no_engine(*args, **kwargs):
        raise AssertionError("the engine started")

    monkeypatch.setattr(AsyncLLM, "from_vllm_config", no_engine)
    settings = WorkerSettings(
        model=str(unsplittable_dir), tensor_parallel_size=2, max_model_len=256
    )
    with pytest.raises(TensorParallelMismatch) as refused:
        VllmEngine.start(settings)
    assert str(refused.value) == STRADDLING


def test_the_worker_command_prints_the_refusal_without_a_traceback(unsplittable_dir):
    from tests.conftest import free_port
    from tests.servers import venv_bin

    run = subprocess.run(
        [
            *(venv_bin("qwen-vllm"), "worker", "--model", str(unsplittable_dir)),
            *("--tensor-parallel-size", "2", "--max-model-len", "256"),
            *("--worker-port", str(free_port())),
            *("--controller-port", str(free_port())),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 2, run.stderr[-3000:]
    assert f"qwen-vllm worker: error: {STRADDLING}" in run.stderr
    assert "Traceback" not in run.stderr + run.stdout


@pytest.mark.parametrize("kv_cache_dtype", ["fp8", "fp8_e4m3", "fp8_e5m2"])
def test_fp8_kv_cache_without_avx512_is_refused_plainly(
    tmp_path, monkeypatch, kv_cache_dtype
):
    from vllm.engine.arg_utils import EngineArgs
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("a CPU-only limitation")
    model = write_demo_model(tmp_path / "demo", SPEC)

    def config(avx512: bool):
        monkeypatch.setattr(torch.cpu, "_is_avx512_supported", lambda: avx512)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        return EngineArgs(
            model=str(model), max_model_len=256, kv_cache_dtype=kv_cache_dtype
        ).create_engine_config()

    with pytest.raises(ValueError, match="AVX-512 or AMX"):
        config(avx512=False)
    # Where the CPU has the instructions, the engine gets the fp8 cache.
    assert config(avx512=True).cache_config.cache_dtype == kv_cache_dtype


@pytest.mark.slow
@pytest.mark.skipif(not gptq_kernel_available(), reason="needs a GPTQ kernel")
def test_int4_generation_matches_the_dequantized_reference(int4_dir):
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(int4_dir), dtype="float16", enforce_eager=True)
    prompt = list(range(1000, 1040))
    try:
        params = SamplingParams(temperature=0, max_tokens=1, logprobs=5)
        output = llm.generate([{"prompt_token_ids": prompt}], params)[0]
    finally:
        llm.llm_engine.engine_core.shutdown()
    config = json.loads((int4_dir / "config.json").read_text())
    reference = ReferenceQwenV1(config, dequantized_weights(int4_dir, bits=4))
    logprobs = torch.log_softmax(reference.logits(prompt, last_only=True)[-1], -1)
    (token,) = output.outputs[0].token_ids
    assert token == int(logprobs.argmax())
    got = output.outputs[0].logprobs[0][token].logprob
    assert abs(got - float(logprobs[token])) < 5e-2
