"""A tiny random-weight Qwen v1 checkpoint in the exact layout of a real release.

It carries the real Qwen vocabulary (copied from an installed PyPI package), so
everything that runs on a real Qwen v1 checkpoint runs on it, offline, on a
laptop CPU. The same arguments and seed always give the same bytes.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from qwen_vllm import DEMO_MODEL_NAME
from qwen_vllm.chat.vocab import (
    ENDOFTEXT_ID,
    VOCAB_FILE_NAME,
    VOCAB_SIZE,
    packaged_vocab_file,
    with_chatml_stops,
)

_DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class DemoModelSpec:
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    # vLLM's CPU attention needs a head size of at least 32.
    kv_channels: int = 32
    intermediate_size: int = 256
    vocab_size: int = 151936
    seq_length: int = 2048
    max_position_embeddings: int = 8192
    rotary_pct: float = 1.0
    rotary_emb_base: float = 10000.0
    use_dynamic_ntk: bool = False
    use_logn_attn: bool = False
    dtype: str = "bfloat16"
    seed: int = 0
    # Checkpoint layout, to exercise every way real releases are stored.
    num_shards: int = 1
    weight_format: str = "safetensors"  # or "bin"
    gpt2_style_config: bool = False

    def validate(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, not {self.dtype!r}")
        if self.weight_format not in ("safetensors", "bin"):
            raise ValueError("weight_format must be 'safetensors' or 'bin'")
        if self.num_shards < 1:
            raise ValueError("num_shards must be at least 1")
        # The model's own checks of the sizes. Imported here: the launcher reads
        # the spec's sizes without loading transformers and torch.
        from qwen_vllm.model.config import QWenConfig

        QWenConfig(**config_dict(self))


def config_dict(spec: DemoModelSpec) -> dict:
    """config.json as a real Qwen v1 release writes it."""
    sizes = {
        "hidden_size": spec.hidden_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "intermediate_size": spec.intermediate_size,
        "max_position_embeddings": spec.max_position_embeddings,
    }
    if spec.gpt2_style_config:
        # The first Qwen-7B-Chat release used GPT-2 field names.
        sizes = {
            "n_embd": spec.hidden_size,
            "n_layer": spec.num_hidden_layers,
            "n_head": spec.num_attention_heads,
            "ffn_hidden_size": spec.intermediate_size,
            "n_positions": spec.max_position_embeddings,
        }
    return {
        "architectures": ["QWenLMHeadModel"],
        "auto_map": {
            "AutoConfig": "configuration_qwen.QWenConfig",
            "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
        },
        "attn_dropout_prob": 0.0,
        "bf16": spec.dtype == "bfloat16",
        "emb_dropout_prob": 0.0,
        "fp16": spec.dtype == "float16",
        "fp32": spec.dtype == "float32",
        **sizes,
        "initializer_range": 0.02,
        "kv_channels": spec.kv_channels,
        "layer_norm_epsilon": 1e-06,
        "model_type": "qwen",
        "no_bias": True,
        "onnx_safe": None,
        "rotary_emb_base": spec.rotary_emb_base,
        "rotary_pct": spec.rotary_pct,
        "scale_attn_weights": True,
        "seq_length": spec.seq_length,
        "softmax_in_fp32": False,
        "tie_word_embeddings": False,
        "tokenizer_class": "QWenTokenizer",
        "torch_dtype": spec.dtype,
        "use_cache": True,
        "use_cache_kernel": False,
        "use_cache_quantization": False,
        "use_dynamic_ntk": spec.use_dynamic_ntk,
        "use_flash_attn": "auto",
        "use_logn_attn": spec.use_logn_attn,
        "vocab_size": spec.vocab_size,
    }


def generation_config_dict() -> dict:
    return {
        "chat_format": "chatml",
        "eos_token_id": with_chatml_stops(),
        "pad_token_id": ENDOFTEXT_ID,
        "max_window_size": 6144,
        "max_new_tokens": 512,
        "do_sample": True,
        "top_k": 0,
        "top_p": 0.8,
        "repetition_penalty": 1.1,
    }


def tokenizer_config_dict(spec: DemoModelSpec) -> dict:
    return {
        "model_max_length": spec.max_position_embeddings,
        "tokenizer_class": "QWenTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]},
    }


def random_state_dict(spec: DemoModelSpec):
    """Weights with Qwen v1's names and shapes, from a seeded generator."""
    import torch

    gen = torch.Generator().manual_seed(spec.seed)
    dtype = getattr(torch, spec.dtype)
    hidden, width = spec.hidden_size, spec.intermediate_size // 2
    std = 0.02

    def randn(*shape: int, scale: float = std) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)

    def norm() -> torch.Tensor:
        # Around one, not exactly one, so a norm applied wrongly shows up.
        return (1.0 + torch.randn(hidden, generator=gen) * 0.1).to(dtype)

    weights = {"transformer.wte.weight": randn(spec.vocab_size, hidden, scale=1.0)}
    for i in range(spec.num_hidden_layers):
        p = f"transformer.h.{i}"
        weights[f"{p}.ln_1.weight"] = norm()
        weights[f"{p}.attn.c_attn.weight"] = randn(3 * hidden, hidden, scale=0.1)
        weights[f"{p}.attn.c_attn.bias"] = randn(3 * hidden, scale=0.1)
        weights[f"{p}.attn.c_proj.weight"] = randn(hidden, hidden, scale=0.1)
        weights[f"{p}.ln_2.weight"] = norm()
        weights[f"{p}.mlp.w1.weight"] = randn(width, hidden, scale=0.1)
        weights[f"{p}.mlp.w2.weight"] = randn(width, hidden, scale=0.1)
        weights[f"{p}.mlp.c_proj.weight"] = randn(hidden, width, scale=0.1)
    weights["transformer.ln_f.weight"] = norm()
    lm_head = randn(spec.vocab_size, hidden, scale=0.5)
    # Rows past the tokenizer are padding, as in real releases: never the
    # argmax, so a sampled id always decodes.
    lm_head[VOCAB_SIZE:] = 0
    weights["lm_head.weight"] = lm_head
    return weights


def _shard_names(spec: DemoModelSpec) -> list[str]:
    ext = "safetensors" if spec.weight_format == "safetensors" else "bin"
    stem = "model" if spec.weight_format == "safetensors" else "pytorch_model"
    if spec.num_shards == 1:
        return [f"{stem}.{ext}"]
    n = spec.num_shards
    return [f"{stem}-{i:05d}-of-{n:05d}.{ext}" for i in range(1, n + 1)]


def _write_weights(spec: DemoModelSpec, weights: dict, out: Path) -> None:
    import torch
    from safetensors.torch import save_file

    names = list(weights)
    files = _shard_names(spec)
    per_shard = -(-len(names) // len(files))
    weight_map: dict[str, str] = {}
    for shard, filename in enumerate(files):
        chunk = {
            n: weights[n] for n in names[shard * per_shard : (shard + 1) * per_shard]
        }
        if spec.weight_format == "safetensors":
            save_file(chunk, out / filename, metadata={"format": "pt"})
        else:
            torch.save(chunk, out / filename)
        weight_map.update(dict.fromkeys(chunk, filename))
    if len(files) > 1:
        index_name = (
            "model.safetensors.index.json"
            if spec.weight_format == "safetensors"
            else "pytorch_model.bin.index.json"
        )
        total = sum(t.numel() * t.element_size() for t in weights.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        _write_json(out / index_name, index)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_demo_model(
    out_dir: str | os.PathLike, spec: DemoModelSpec | None = None
) -> Path:
    """Write the checkpoint to out_dir (atomically) and return its path."""
    spec = spec or DemoModelSpec()
    spec.validate()
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _write_json(staging / "config.json", config_dict(spec))
        _write_json(staging / "generation_config.json", generation_config_dict())
        _write_json(staging / "tokenizer_config.json", tokenizer_config_dict(spec))
        shutil.copyfile(packaged_vocab_file(), staging / VOCAB_FILE_NAME)
        _write_weights(spec, random_state_dict(spec), staging)
        _write_json(staging / "qwen_vllm_demo.json", asdict(spec))
        staging.chmod(0o755)
        for path in staging.iterdir():
            path.chmod(0o644)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def ensure_demo_model(
    out_dir: str | os.PathLike, spec: DemoModelSpec | None = None
) -> Path:
    """Write the demo model unless out_dir already holds one with this spec.

    Safe to call from several processes at once (workers starting together).
    """
    spec = spec or DemoModelSpec()
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    marker = out / "qwen_vllm_demo.json"
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.is_file() and json.loads(marker.read_text()) == asdict(spec):
            return out
        return write_demo_model(out, spec)


def default_demo_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "qwen_vllm" / DEMO_MODEL_NAME
