"""GenerationDefaults: what a request that sets nothing gets, from vLLM's own
reading of generation_config.json."""

from __future__ import annotations

import json
from pathlib import Path

from vllm.config import ModelConfig
from vllm.plugins import load_general_plugins

from qwen_vllm.model.generation_defaults import GenerationDefaults
from tests.conftest import REAL_GENERATION_CONFIG


def defaults_of(
    demo_dir: Path, tmp_path: Path, config: dict | None
) -> GenerationDefaults:
    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "qwen.tiktoken", "tokenizer_config.json"):
        (model / name).write_bytes((demo_dir / name).read_bytes())
    if config is not None:
        (model / "generation_config.json").write_text(json.dumps(config))
    load_general_plugins()  # as every vLLM process does: Qwen v1 is known
    return GenerationDefaults.of(ModelConfig(model=str(model), tokenizer=str(model)))


def test_a_qwen_release_config(demo_dir, tmp_path) -> None:
    defaults = defaults_of(demo_dir, tmp_path, REAL_GENERATION_CONFIG)
    assert defaults.sampling == {"top_k": 0, "top_p": 0.8, "repetition_penalty": 1.1}
    assert (defaults.max_new_tokens, defaults.max_window_size) == (512, 6144)
    assert defaults.max_tokens(None, room=100) == 100
    assert defaults.max_tokens(None, room=1000) == 512
    assert defaults.max_tokens(700, room=1000) == 700
    assert defaults.window(8192, None) == 6144
    assert defaults.window(2048, None) == 2048 - 512
    assert defaults.window(2048, 1800) == 248
    assert defaults.describe() == (
        "max_new_tokens=512, max_window_size=6144, repetition_penalty=1.1, "
        "top_k=0, top_p=0.8"
    )


def test_no_generation_config(demo_dir, tmp_path) -> None:
    defaults = defaults_of(demo_dir, tmp_path, None)
    assert defaults == GenerationDefaults()
    assert defaults.max_tokens(None, room=300) == 300
    assert defaults.window(8192, None) == 6144  # Qwen's 3/4 of the context
    assert "neutral" in defaults.describe()
