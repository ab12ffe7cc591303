"""Fixtures shared by the whole suite: demo checkpoints and engine settings."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

# Small KV cache on CPU; set before any vLLM engine process is spawned.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from qwen_vllm.model.demo import DemoModelSpec, write_demo_model  # noqa: E402

# A second architecture beside the default demo: partial rotary, more layers
# and heads, GPT-2 style config names, stored in three safetensors shards.
WIDE_SPEC = DemoModelSpec(
    hidden_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    kv_channels=32,
    intermediate_size=384,
    rotary_pct=0.5,
    rotary_emb_base=20000.0,
    seq_length=1024,
    max_position_embeddings=1024,
    dtype="float32",
    seed=7,
    num_shards=3,
    gpt2_style_config=True,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """The default embedded demo model, exactly as `qwen-vllm serve` uses it."""
    return write_demo_model(tmp_path_factory.mktemp("models") / "qwen-v1-demo")


@pytest.fixture(scope="session")
def wide_dir(tmp_path_factory) -> Path:
    return write_demo_model(tmp_path_factory.mktemp("models") / "wide", WIDE_SPEC)
