"""Qwen v1 weights in the Qwen2 layout (split q/k/v, gate/up/down).

With dynamic NTK and logN off, Qwen v1 is Qwen2 up to weight names, so the
same weights can run on vLLM's and transformers' own Qwen2 implementations:
the benchmark's baseline and an independent check of the math.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from qwen_vllm.model.config import QWenConfig

_RENAMES = {
    "transformer.wte.weight": "model.embed_tokens.weight",
    "transformer.ln_f.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_LAYER_RENAMES = {
    "ln_1.weight": "input_layernorm.weight",
    "ln_2.weight": "post_attention_layernorm.weight",
    "attn.c_proj.weight": "self_attn.o_proj.weight",
    "mlp.w2.weight": "mlp.gate_proj.weight",
    "mlp.w1.weight": "mlp.up_proj.weight",
    "mlp.c_proj.weight": "mlp.down_proj.weight",
}


def qwen2_state_dict(weights: dict) -> dict:
    out = {}
    for name, tensor in weights.items():
        if name in _RENAMES:
            out[_RENAMES[name]] = tensor
            continue
        _, _, layer, rest = name.split(".", 3)
        prefix = f"model.layers.{layer}."
        if rest.startswith("attn.c_attn."):
            kind = rest.rsplit(".", 1)[1]  # weight or bias
            for proj, part in zip("qkv", tensor.chunk(3, 0), strict=True):
                out[f"{prefix}self_attn.{proj}_proj.{kind}"] = part.contiguous()
        else:
            out[prefix + _LAYER_RENAMES[rest]] = tensor
    return out


def qwen2_config_dict(config: QWenConfig) -> dict:
    if config.use_dynamic_ntk or config.use_logn_attn or config.rotary_pct != 1.0:
        raise ValueError(
            "Only Qwen v1 checkpoints with use_dynamic_ntk, use_logn_attn off and "
            "rotary_pct 1.0 have an exact Qwen2 equivalent."
        )
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": config.hidden_size,
        "intermediate_size": config.mlp_width,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_attention_heads,
        "head_dim": config.kv_channels,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_context_length,
        "rms_norm_eps": config.layer_norm_epsilon,
        "rope_theta": config.rotary_emb_base,
        "tie_word_embeddings": config.tie_word_embeddings,
        "vocab_size": config.vocab_size,
        "use_sliding_window": False,
        "torch_dtype": str(config.dtype).removeprefix("torch."),
    }


def write_qwen2_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """Write the Qwen2-layout copy of the Qwen v1 checkpoint at src."""
    from safetensors.torch import load_file, save_file

    src, dst = Path(src), Path(dst)
    config = QWenConfig.from_pretrained(src)
    weights: dict = {}
    for file in sorted(src.glob("*.safetensors")):
        weights.update(load_file(file))
    if not weights:
        raise FileNotFoundError(f"No .safetensors weights in {src}")
    dst.mkdir(parents=True, exist_ok=True)
    save_file(qwen2_state_dict(weights), dst / "model.safetensors")
    (dst / "config.json").write_text(json.dumps(qwen2_config_dict(config), indent=2))
    for name in ("qwen.tiktoken", "tokenizer_config.json", "generation_config.json"):
        if (src / name).exists():
            shutil.copyfile(src / name, dst / name)
    return dst
