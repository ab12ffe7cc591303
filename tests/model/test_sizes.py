"""Which tensor-parallel sizes a GPTQ checkpoint's weights split into.

Pure Python, no engine: the sizes are those of the published Qwen v1 configs,
and every expectation below is worked out by hand from them.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from qwen_vllm.model.config import QWenConfig
from qwen_vllm.model.sizes import GptqSplit, tensor_parallel_refusal

# config.json sizes of the Qwen v1 releases (intermediate_size is twice the
# MLP width; kv_channels is 128 everywhere).
QWEN_V1 = {
    "1.8B": {
        "hidden_size": 2048,
        "num_attention_heads": 16,
        "intermediate_size": 11008,
    },
    "7B": {"hidden_size": 4096, "num_attention_heads": 32, "intermediate_size": 22016},
    "14B": {"hidden_size": 5120, "num_attention_heads": 40, "intermediate_size": 27392},
    "72B": {"hidden_size": 8192, "num_attention_heads": 64, "intermediate_size": 49152},
}
# quantization_config of Qwen's -Int4 releases (the -Int8 ones differ in bits).
INT4 = {
    "bits": 4,
    "group_size": 128,
    "damp_percent": 0.01,
    "desc_act": False,
    "static_groups": False,
    "sym": True,
    "true_sequential": True,
    "model_name_or_path": None,
    "model_file_base_name": "model",
    "quant_method": "gptq",
}


def gptq(size: str, **quantization) -> dict:
    return {
        "model_type": "qwen",
        **QWEN_V1[size],
        "quantization_config": {**INT4, **quantization},
    }


@pytest.mark.parametrize(
    ("size", "works", "mlp_width"),
    [
        # MLP width / tp must be a multiple of 128 (the attention always is:
        # hidden_size / tp = heads / tp * 128).
        ("1.8B", [1], 5504),  # 5504 = 43 * 128; / 2 = 2752 = 21.5 * 128
        ("7B", [1, 2], 11008),  # / 2 = 5504 = 43 * 128; / 4 = 2752
        ("14B", [1], 13696),  # 13696 = 107 * 128; / 2 = 6848 = 53.5 * 128
        ("72B", [1, 2, 4, 8], 24576),  # 24576 = 192 * 128; / 8 = 3072 = 24 * 128
    ],
)
@pytest.mark.parametrize("bits", [4, 8])
def test_real_qwen_sizes(size, works, mlp_width, bits):
    config = gptq(size, bits=bits)
    for tp in (1, 2, 4, 8):
        refusal = tensor_parallel_refusal(config, tp)
        if tp in works:
            assert refusal is None, refusal
            continue
        per_rank = mlp_width // tp
        assert refusal == (
            f"tensor_parallel_size {tp} splits the {mlp_width} inputs of the MLP's "
            f"output projection (mlp.c_proj) into {per_rank} per rank, not a "
            "multiple of the GPTQ group size 128; sizes that work for this "
            f"checkpoint: {', '.join(map(str, works))}"
        )


def test_qwen_14b_int4_at_tp2_is_the_upstream_report():
    refusal = tensor_parallel_refusal(gptq("14B"), 2)
    assert "13696 inputs" in refusal and "6848 per rank" in refusal
    assert "group size 128" in refusal
    assert refusal.endswith("sizes that work for this checkpoint: 1")


def test_a_quantization_config_object_reads_the_same():
    # QWenConfig, as vLLM's config hook sees it: defaults, GPT-2 style names.
    config = QWenConfig(
        n_embd=5120,
        n_head=40,
        ffn_hidden_size=27392,
        quantization_config=dict(INT4),
    )
    assert tensor_parallel_refusal(config, 2) == tensor_parallel_refusal(gptq("14B"), 2)
    assert tensor_parallel_refusal(config, 1) is None


def test_gpt2_style_names_and_defaults_of_a_raw_config():
    first_release = {
        "n_embd": 4096,
        "n_head": 32,
        "ffn_hidden_size": 22016,
        "quantization_config": INT4,
    }
    assert GptqSplit.of(first_release).working_sizes() == [1, 2]
    # Missing sizes take QWenConfig's defaults (Qwen-7B's).
    assert GptqSplit.of({"quantization_config": INT4}).working_sizes() == [1, 2]


@pytest.mark.parametrize("size", list(QWEN_V1))
@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_one_group_per_channel_always_splits(size, tp):
    assert tensor_parallel_refusal(gptq(size, group_size=-1), tp) is None
    # desc_act means nothing without groups; vLLM ignores it then.
    assert tensor_parallel_refusal(gptq(size, group_size=-1, desc_act=True), tp) is None


@pytest.mark.parametrize("size", list(QWEN_V1))
@pytest.mark.parametrize("tp", [1, 2, 4, 8])
@pytest.mark.parametrize(
    "quantization",
    [
        None,
        {"quant_method": "awq", "bits": 4, "group_size": 128},
        {"quant_method": "fp8"},
    ],
)
def test_configs_without_gptq_are_never_refused(size, tp, quantization):
    config = dict(QWEN_V1[size])
    if quantization is not None:
        config["quantization_config"] = quantization
    assert tensor_parallel_refusal(config, tp) is None
    assert tensor_parallel_refusal(QWenConfig(**config), tp) is None


def test_desc_act_with_groups_is_refused_at_every_size():
    # vLLM 0.32 no longer loads activation-order checkpoints with groups.
    for tp in (1, 2):
        refusal = tensor_parallel_refusal(gptq("72B", desc_act=True), tp)
        assert "desc_act=True" in refusal and "group size 128" in refusal
        assert refusal.endswith("no tensor_parallel_size works for this checkpoint")


def test_smaller_groups_split_further():
    # 13696 = 214 * 64; / 2 = 6848 = 107 * 64, / 4 = 3424 = 53.5 * 64.
    assert GptqSplit.of(gptq("14B", group_size=64)).working_sizes() == [1, 2]
    assert GptqSplit.of(gptq("14B", group_size=32)).working_sizes() == [1, 2, 4]


def test_sizes_the_heads_refuse_are_left_to_the_heads_check():
    # 40 heads over 16 ranks: vLLM (and the launch plan) refuse it, naming
    # the heads; the GPTQ rule has nothing to add.
    assert tensor_parallel_refusal(gptq("14B"), 16) is None
    twelve_heads = {
        "hidden_size": 1536,
        "num_attention_heads": 12,
        "intermediate_size": 8192,
        "quantization_config": INT4,
    }
    # 4096 = 32 * 128; / 8 = 512, but 12 heads do not split 8 ways.
    assert GptqSplit.of(twelve_heads).working_sizes() == [1, 2, 4]


def test_unaligned_attention_and_packing_are_named():
    attention = {
        "hidden_size": 1920,  # 7.5 groups of 256
        "num_attention_heads": 15,
        "intermediate_size": 7680,
        "quantization_config": {**INT4, "group_size": 256},
    }
    assert tensor_parallel_refusal(attention, 1) == (
        "the 1920 inputs of the attention's QKV projection (attn.c_attn) are not "
        "a multiple of the GPTQ group size 256; no tensor_parallel_size works "
        "for this checkpoint"
    )
    packed = {
        "hidden_size": 256,
        "num_attention_heads": 2,
        "kv_channels": 128,
        "intermediate_size": 48,  # 24 outputs each for w1 and w2: 12 per rank
        "quantization_config": {**INT4, "group_size": -1},
    }
    assert tensor_parallel_refusal(packed, 2) == (
        "tensor_parallel_size 2 leaves 12 outputs of the MLP's gate and up "
        "projections (mlp.w2, mlp.w1) per rank, not a multiple of 8 (GPTQ packs "
        "8 4-bit zero points into one 32-bit word); sizes that work for this "
        "checkpoint: 1"
    )


@pytest.mark.parametrize(
    ("quantization", "message"),
    [
        ({"group_size": "128"}, "group_size '128' is not an integer"),
        ({"group_size": 0}, "group_size 0 is not a size"),
        ({"bits": 5}, "bits 5 is not 2, 3, 4 or 8"),
    ],
)
def test_unusable_quantization_fields_are_named(quantization, message):
    with pytest.raises(ValueError, match=message):
        GptqSplit.of(gptq("7B", **quantization))


def test_imports_neither_torch_nor_vllm_nor_transformers():
    # The launch tooling checks plans with it, in processes without them.
    code = (
        "import sys\n"
        "from qwen_vllm.model.sizes import tensor_parallel_refusal\n"
        "heavy = {'torch', 'vllm', 'transformers'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
