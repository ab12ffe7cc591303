"""`qwen-vllm merge-lora BASE ADAPTER OUT`: a LoRA fine-tune as a standalone
checkpoint in the release layout.

For adapters vLLM cannot serve as adapters (Qwen's "LoRA (emb)", which also
trains the embedding and LM head through `modules_to_save`), and for anyone
who wants one model directory per fine-tune. Each weight file of the base is
rewritten with the same name and the same tensors, a LoRA-updated weight as
W + s * B @ A (s = alpha / r, or alpha / sqrt(r) with rsLoRA; computed in
float32, stored in the base's dtype) and a `modules_to_save` module replaced by
the adapter's copy; every other file is copied as it is. Q-LoRA adapters sit on
a GPTQ model, whose integer weights cannot take an update (Qwen's README says
so too): serve those with `--lora` instead.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from qwen_vllm.checkpoints.adapters import (
    WEIGHT_FILES,
    AdapterRefused,
    adapter_config,
)
from qwen_vllm.checkpoints.directory import read_config

_PEFT_PREFIX = "base_model.model."
_SAVED_MODULE = ".modules_to_save"


def _load(file: Path) -> dict[str, torch.Tensor]:
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(file)
    return torch.load(file, map_location="cpu", weights_only=True)


def _save(tensors: dict[str, torch.Tensor], file: Path) -> None:
    if file.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(tensors, file, metadata={"format": "pt"})
    else:
        torch.save(tensors, file)


def _weight_files(base: Path) -> list[Path]:
    files = sorted(base.glob("*.safetensors")) or sorted(base.glob("*.bin"))
    files = [f for f in files if not f.name.startswith("adapter_model")]
    if not files:
        raise AdapterRefused(f"{base}: no .safetensors or .bin weight files")
    return files


class AdapterUpdates:
    """What the adapter changes, by checkpoint tensor name."""

    def __init__(self, adapter_dir: Path, config: dict) -> None:
        tensors = _load(
            next(
                adapter_dir / name
                for name in WEIGHT_FILES
                if (adapter_dir / name).is_file()
            )
        )
        rank, alpha = config["r"], config["lora_alpha"]
        self.scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        self.transposed = bool(config.get("fan_in_fan_out"))
        self.lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.replaced: dict[str, torch.Tensor] = {}
        for name, tensor in tensors.items():
            plain = name.removeprefix(_PEFT_PREFIX)
            if plain.endswith(".lora_A.weight"):
                module = plain.removesuffix(".lora_A.weight")
                b = tensors[name.replace(".lora_A.", ".lora_B.")]
                self.lora[f"{module}.weight"] = (tensor, b)
            elif plain.endswith(".lora_B.weight"):
                continue
            else:  # a modules_to_save copy: PEFT saves it under the base's name
                self.replaced[plain.replace(_SAVED_MODULE, "", 1)] = tensor
        self.pending = set(self.lora) | set(self.replaced)

    def apply(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        if name in self.replaced:
            self.pending.discard(name)
            return self.replaced[name].to(weight.dtype).contiguous()
        if name in self.lora:
            self.pending.discard(name)
            a, b = self.lora[name]
            update = b.float() @ a.float()
            if self.transposed:
                update = update.T
            return (weight.float() + self.scale * update).to(weight.dtype)
        return weight


def merge_lora(
    base: str | Path,
    adapter: str | Path,
    out: str | Path,
    progress: Callable[[str], None] = print,
) -> Path:
    """Write base with adapter merged into out (which must not exist)."""
    base, adapter, out = Path(base), Path(adapter), Path(out)
    config = read_config(base)
    if config.get("quantization_config"):
        raise AdapterRefused(
            f"{base} is quantized ({config['quantization_config'].get('quant_method')})"
            ": a Q-LoRA adapter cannot be merged into integer weights; serve it "
            "on this model with --lora instead"
        )
    updates = AdapterUpdates(adapter, adapter_config(adapter, f"adapter {adapter}"))
    if out.exists():
        raise FileExistsError(f"{out} exists; name a new directory for the output")
    files = _weight_files(base)
    out.mkdir(parents=True)
    try:
        for entry in base.iterdir():
            if entry.is_file() and entry not in files:
                shutil.copyfile(entry, out / entry.name)
        for i, file in enumerate(files, start=1):
            tensors = {k: updates.apply(k, v) for k, v in _load(file).items()}
            _save(tensors, out / file.name)
            progress(f"merged {file.name} ({i}/{len(files)})")
        if updates.pending:
            raise AdapterRefused(
                f"{adapter} has tensors for weights the base does not have: "
                f"{sorted(updates.pending)[:3]}; is it an adapter of this model "
                "(a LoRA adapter, not DoRA or embedding LoRA)?"
            )
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return out
