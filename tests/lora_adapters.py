"""LoRA adapters for Qwen v1 checkpoints, made with the real peft library as
Qwen's fine-tuning script makes them, and the merge the tests check serving
against (written here from LoRA's formula, not taken from qwen_vllm).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
from torch import nn

from tests.reference_qwen import read_checkpoint

# The modules Qwen's finetune.py trains with LoRA and Q-LoRA (c_proj: both the
# attention output and the MLP output projection).
QWEN_TARGETS = ["c_attn", "c_proj", "w1", "w2"]
_PEFT_PREFIX = "base_model.model."


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    rank: int
    alpha: int
    rslora: bool = False
    seed: int = 0
    std: float = 0.05  # of every LoRA A and B entry: both non-zero
    safetensors: bool = True  # else adapter_model.bin
    targets: tuple[str, ...] = tuple(QWEN_TARGETS)
    # Qwen's "LoRA (emb)": the embedding and LM head trained whole as well.
    modules_to_save: tuple[str, ...] = ()


def _skeleton(weights: dict[str, torch.Tensor]) -> nn.Module:
    """A module tree with the checkpoint's names: a Linear for every weight of
    a target module and the LM head, and the embedding, holding the base's
    values: all peft needs to wrap it."""
    root = nn.Module()
    for name, tensor in weights.items():
        path = name.removesuffix(".weight").split(".")
        if not name.endswith(".weight") or path[-1] not in [*QWEN_TARGETS, "lm_head"]:
            continue
        parent = root
        for part in path[:-1]:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        out_features, in_features = tensor.shape
        bias = name.removesuffix(".weight") + ".bias" in weights
        parent.add_module(path[-1], nn.Linear(in_features, out_features, bias=bias))
    root.transformer.add_module(
        "wte", nn.Embedding(*weights["transformer.wte.weight"].shape)
    )
    root.load_state_dict(
        {k: v.float() for k, v in weights.items() if k in root.state_dict()},
        strict=False,
    )
    return root


def write_adapter(base_dir: Path, out_dir: Path, spec: AdapterSpec) -> Path:
    """A PEFT adapter for base_dir's model, saved as PEFT saves it."""
    from peft import LoraConfig, get_peft_model

    _, weights = read_checkpoint(base_dir)
    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        use_rslora=spec.rslora,
        target_modules=list(spec.targets),
        modules_to_save=list(spec.modules_to_save) or None,
        lora_dropout=0.0,
        bias="none",
        init_lora_weights=False,
    )
    model = get_peft_model(_skeleton(weights), config)
    generator = torch.Generator().manual_seed(spec.seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * spec.std)
            elif ".modules_to_save." in name:  # "trained": the base plus noise
                noise = torch.randn(param.shape, generator=generator) * spec.std
                param.copy_(param + noise)
    model.save_pretrained(str(out_dir), safe_serialization=spec.safetensors)
    return out_dir


def read_adapter(adapter_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    file = adapter_dir / "adapter_model.safetensors"
    if file.exists():
        from safetensors.torch import load_file

        tensors = load_file(file)
    else:
        tensors = torch.load(
            adapter_dir / "adapter_model.bin", map_location="cpu", weights_only=True
        )
    return config, {k: v.to(torch.float64) for k, v in tensors.items()}


def merged(base_dir: Path, adapter_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, float64 weights) of the base with the adapter merged in."""
    config, weights = read_checkpoint(base_dir)
    return config, merged_into(weights, adapter_dir)


def merged_into(
    weights: dict[str, torch.Tensor], adapter_dir: Path
) -> dict[str, torch.Tensor]:
    """Float64 weights with the adapter merged in: W + s * B @ A, s = alpha / r,
    or alpha / sqrt(r) with rsLoRA; a module the adapter saved whole
    (modules_to_save) replaced by its copy."""
    weights = dict(weights)
    adapter_config, tensors = read_adapter(adapter_dir)
    rank = adapter_config["r"]
    alpha = adapter_config["lora_alpha"]
    scale = alpha / (math.sqrt(rank) if adapter_config.get("use_rslora") else rank)
    updated = 0
    for name, a in tensors.items():
        if ".lora_" not in name:  # PEFT names a saved module as the base does
            weights[name.removeprefix(_PEFT_PREFIX)] = a
            updated += 1
            continue
        if not name.endswith(".lora_A.weight"):
            continue
        module = name.removeprefix(_PEFT_PREFIX).removesuffix(".lora_A.weight")
        b = tensors[name.replace(".lora_A.", ".lora_B.")]
        weights[f"{module}.weight"] = weights[f"{module}.weight"] + scale * (b @ a)
        updated += 1
    assert updated, f"no LoRA weights in {adapter_dir}"
    return weights
