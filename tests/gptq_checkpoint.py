"""GPTQ (AutoGPTQ "gptq" v1 format) versions of demo checkpoints, for tests.

Written from the format: per input group and output channel, symmetric
round-to-nearest quantization with zero point 2**(bits-1); integers packed
into int32 along the input dim (qweight [in/pack, out]); zero points stored
minus one and packed along the output dim (qzeros [in/group, out/pack]);
scales [in/group, out] in float16; g_idx [in] = i // group. Also the
independent dequantization the reference forward uses.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

QUANTIZED = ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj")


def _pack(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack unsigned integers (< 2**bits) along dim into int32 words."""
    per_word = 32 // bits
    values = values.to(torch.int64).movedim(dim, 0)
    rows = values.shape[0] // per_word
    grouped = values.reshape(rows, per_word, *values.shape[1:])
    word = torch.zeros(rows, *values.shape[1:], dtype=torch.int64)
    for j in range(per_word):
        word |= grouped[:, j] << (bits * j)
    word = torch.where(word >= 2**31, word - 2**32, word)  # as signed int32
    return word.to(torch.int32).movedim(0, dim)


def _unpack(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    per_word = 32 // bits
    words = words.to(torch.int64).movedim(dim, 0) & 0xFFFFFFFF
    parts = [(words >> (bits * j)) & (2**bits - 1) for j in range(per_word)]
    stacked = torch.stack(parts, dim=1)
    return stacked.reshape(-1, *words.shape[1:]).movedim(0, dim)


def quantize(weight: torch.Tensor, bits: int, group: int) -> dict[str, torch.Tensor]:
    """GPTQ tensors for one HF linear weight [out, in]."""
    w = weight.to(torch.float32).T  # [in, out]
    n_in, n_out = w.shape
    maxq = 2**bits - 1
    zero = 2 ** (bits - 1)
    grouped = w.reshape(n_in // group, group, n_out)
    scale = grouped.abs().amax(dim=1) * 2 / maxq  # [groups, out]
    scale = scale.clamp(min=1e-8).to(torch.float16)
    q = torch.round(grouped / scale.float().unsqueeze(1)) + zero
    q = q.clamp(0, maxq).reshape(n_in, n_out)
    zeros = torch.full((n_in // group, n_out), zero - 1, dtype=torch.int64)
    return {
        "qweight": _pack(q, bits, 0),
        "qzeros": _pack(zeros, bits, 1),
        "scales": scale,
        "g_idx": (torch.arange(n_in) // group).to(torch.int32),
    }


def dequantize(tensors: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
    """The HF weight [out, in] that GPTQ tensors stand for (float64)."""
    q = _unpack(tensors["qweight"], bits, 0).double()  # [in, out]
    zeros = _unpack(tensors["qzeros"], bits, 1).double() + 1  # [groups, out]
    scales = tensors["scales"].double()
    g = tensors["g_idx"].long()
    return ((q - zeros[g]) * scales[g]).T


def write_gptq_checkpoint(src: Path, dst: Path, bits: int = 4, group: int = 32) -> Path:
    shutil.copytree(src, dst)
    weights = load_file(src / "model.safetensors")
    out: dict[str, torch.Tensor] = {}
    for name, tensor in weights.items():
        base = name.removesuffix(".weight")
        if name.endswith(".weight") and base.split(".", 3)[-1] in QUANTIZED:
            for part, value in quantize(tensor, bits, group).items():
                out[f"{base}.{part}"] = value.contiguous()
        else:
            out[name] = tensor.to(torch.float16)
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config["torch_dtype"] = "float16"
    config["quantization_config"] = {
        "bits": bits,
        "group_size": group,
        "damp_percent": 0.01,
        "desc_act": False,
        "static_groups": False,
        "sym": True,
        "true_sequential": True,
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
    }
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    (dst / "qwen_vllm_demo.json").unlink(missing_ok=True)
    return dst


def dequantized_weights(path: Path, bits: int) -> dict[str, torch.Tensor]:
    """The checkpoint's weights in plain HF names, dequantized (float64)."""
    raw = load_file(path / "model.safetensors")
    weights: dict[str, torch.Tensor] = {}
    for name, tensor in raw.items():
        if name.endswith(".qweight"):
            base = name.removesuffix(".qweight")
            parts = {
                p: raw[f"{base}.{p}"] for p in ("qweight", "qzeros", "scales", "g_idx")
            }
            weights[f"{base}.weight"] = dequantize(parts, bits)
        elif not name.endswith((".qzeros", ".scales", ".g_idx")):
            weights[name] = tensor.double()
    return weights
