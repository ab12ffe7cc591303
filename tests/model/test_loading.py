"""Weight loading through vLLM's real loader, without starting an engine.

The model is built in this process (world size 1) and filled by vLLM's
DefaultModelLoader from checkpoints in every layout real releases use.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen_vllm.checkpoints.demo import DemoModelSpec, write_demo_model
from tests.reference_qwen import read_checkpoint


def assert_matches_checkpoint(model, path):
    _, weights = read_checkpoint(path)
    params = dict(model.named_parameters())
    layers = model.config.num_hidden_layers
    for i in range(layers):
        ours, ckpt = f"model.layers.{i}", f"transformer.h.{i}"
        gate_up = params[f"{ours}.mlp.gate_up_proj.weight"].double()
        expected = torch.cat(
            [weights[f"{ckpt}.mlp.w2.weight"], weights[f"{ckpt}.mlp.w1.weight"]]
        )
        assert torch.equal(gate_up, expected), f"{ckpt}: gate is w2, up is w1"
        for param, tensor in [
            ("self_attn.qkv_proj.weight", "attn.c_attn.weight"),
            ("self_attn.qkv_proj.bias", "attn.c_attn.bias"),
            ("self_attn.o_proj.weight", "attn.c_proj.weight"),
            ("mlp.down_proj.weight", "mlp.c_proj.weight"),
            ("input_layernorm.weight", "ln_1.weight"),
            ("post_attention_layernorm.weight", "ln_2.weight"),
        ]:
            assert torch.equal(
                params[f"{ours}.{param}"].double(), weights[f"{ckpt}.{tensor}"]
            ), f"{ours}.{param} is not {ckpt}.{tensor}"
    for param, tensor in [
        ("model.embed_tokens.weight", "transformer.wte.weight"),
        ("model.norm.weight", "transformer.ln_f.weight"),
    ]:
        assert torch.equal(params[param].double(), weights[tensor]), param
    assert torch.equal(params["lm_head.weight"].double(), weights["lm_head.weight"])


def test_sharded_safetensors_with_gpt2_style_config(load, wide_dir):
    model = load(wide_dir)
    assert type(model).__name__ == "QWenLMHeadModel"
    assert model.config.num_hidden_layers == 3
    assert_matches_checkpoint(model, wide_dir)


def test_sharded_bin_checkpoint(load, tmp_path):
    path = write_demo_model(
        tmp_path / "bin",
        DemoModelSpec(dtype="float32", num_shards=2, weight_format="bin"),
    )
    assert_matches_checkpoint(load(path), path)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision(load, demo_dir, dtype):
    model = load(demo_dir, dtype=dtype)
    assert model.lm_head.weight.dtype == getattr(torch, dtype)


def _rewrite(path, change):
    file = path / "model.safetensors"
    weights = load_file(file)
    change(weights)
    save_file(weights, file, metadata={"format": "pt"})


def test_missing_weight_is_named(load, tmp_path):
    path = write_demo_model(tmp_path / "m", DemoModelSpec(dtype="float32"))
    _rewrite(path, lambda w: w.pop("transformer.h.1.mlp.w1.weight"))
    with pytest.raises(
        ValueError, match=r"missing weights.*transformer\.h\.1\.mlp\.w1"
    ):
        load(path)


def test_unexpected_weight_is_named(load, tmp_path):
    path = write_demo_model(tmp_path / "x", DemoModelSpec(dtype="float32"))
    _rewrite(
        path, lambda w: w.update({"transformer.h.0.attn.k_norm.weight": torch.ones(32)})
    )
    with pytest.raises(
        ValueError, match=r"Unexpected weight 'transformer\.h\.0\.attn\.k_norm"
    ):
        load(path)


def _tie_embeddings(path):
    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    config["tie_word_embeddings"] = True
    config_file.write_text(json.dumps(config))


@pytest.mark.parametrize("lm_head", ["absent", "same values"])
def test_tied_embeddings_share_the_input_embedding(load, tmp_path, lm_head):
    """With tied embeddings the output projection is the input embedding,
    whether the checkpoint leaves lm_head out or saves a copy of it."""
    path = write_demo_model(tmp_path / "t", DemoModelSpec(dtype="float32"))
    _tie_embeddings(path)
    wte = load_file(path / "model.safetensors")["transformer.wte.weight"]
    if lm_head == "absent":
        _rewrite(path, lambda w: w.pop("lm_head.weight"))
    else:
        _rewrite(path, lambda w: w.update({"lm_head.weight": wte.clone()}))
    model = load(path, post_process=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.model.embed_tokens.weight, wte)


def test_tied_config_with_a_different_lm_head_uses_the_checkpoint(load, tmp_path):
    """A config claiming tied embeddings next to an lm_head of other values
    (a fine-tune that trained the head): the trained head is served, as
    Transformers does, not silently replaced by the input embedding."""
    path = write_demo_model(tmp_path / "t", DemoModelSpec(dtype="float32"))
    _tie_embeddings(path)
    weights = load_file(path / "model.safetensors")
    head = torch.full_like(weights["lm_head.weight"], 0.5)
    _rewrite(path, lambda w: w.update({"lm_head.weight": head}))
    model = load(path, post_process=True)
    assert torch.equal(model.lm_head.weight, head)
    assert torch.equal(
        model.model.embed_tokens.weight, weights["transformer.wte.weight"]
    )
