"""LoRA adapters as PEFT writes them (Qwen's finetune.py with --use_lora or
--q_lora): a directory with adapter_config.json and adapter_model.safetensors
or adapter_model.bin.

Read and checked before the engine starts, so a wrong path or an adapter vLLM
cannot serve is one message at start, not a failed request later. Pure Python.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from qwen_vllm.model.refusal import ConfigRefused

WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
# vLLM 0.32's allowed --max-lora-rank values (vllm.config.lora.MaxLoRARanks).
VLLM_MAX_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class AdapterRefused(ConfigRefused):
    """A LoRA adapter that cannot be served; the message says what to do."""


def adapter_config(path: Path, where: str) -> dict:
    """A PEFT LoRA directory's adapter_config.json, once its files are there."""
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise AdapterRefused(
            f"{where}: no adapter_config.json there; pass the directory "
            "PEFT's save_pretrained (Qwen's finetune.py) wrote"
        )
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise AdapterRefused(f"{where}: cannot read {config_file}: {exc}") from exc
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise AdapterRefused(
            f"{where}: not a LoRA adapter (peft_type "
            f"{config.get('peft_type') if isinstance(config, dict) else None!r})"
        )
    if not any((path / file).is_file() for file in WEIGHT_FILES):
        files = " or ".join(WEIGHT_FILES)
        raise AdapterRefused(f"{where}: no {files} beside its config")
    rank = config.get("r")
    if not isinstance(rank, int) or not 0 < rank <= VLLM_MAX_RANKS[-1]:
        raise AdapterRefused(
            f"{where}: rank r={rank!r}; vLLM serves ranks 1 to {VLLM_MAX_RANKS[-1]}"
        )
    return config


@dataclasses.dataclass(frozen=True)
class LoraAdapter:
    name: str
    path: Path
    rank: int

    @classmethod
    def read(cls, name: str, path: str | Path) -> LoraAdapter:
        where = f"LoRA adapter {name!r} ({path})"
        path = Path(path).expanduser()
        config = adapter_config(path, where)
        if config.get("modules_to_save"):
            raise AdapterRefused(
                f"{where}: it also trains whole modules "
                f"({', '.join(config['modules_to_save'])}; Qwen's 'LoRA (emb)'), "
                "which vLLM cannot serve as an adapter; write the fine-tuned model "
                "with `qwen-vllm merge-lora BASE ADAPTER OUT` and serve it with "
                "--model OUT"
            )
        return cls(name=name, path=path, rank=config["r"])


def max_lora_rank(adapters: list[LoraAdapter], asked: int | None = None) -> int:
    """The --max-lora-rank to start vLLM with: the one asked for, checked
    against vLLM's choices and the adapters, or the smallest of vLLM's choices
    that holds every adapter (16, vLLM's default, without any)."""
    largest = max((adapter.rank for adapter in adapters), default=16)
    if asked is None:
        return next(rank for rank in VLLM_MAX_RANKS if rank >= largest)
    if asked not in VLLM_MAX_RANKS:
        choices = ", ".join(map(str, VLLM_MAX_RANKS))
        raise AdapterRefused(f"--max-lora-rank {asked}: vLLM serves one of {choices}")
    for adapter in adapters:
        if adapter.rank > asked:
            raise AdapterRefused(
                f"LoRA adapter {adapter.name!r} ({adapter.path}) has rank "
                f"{adapter.rank}, more than --max-lora-rank {asked}; raise it"
            )
    return asked
