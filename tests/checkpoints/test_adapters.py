"""LoRA adapter directories: what is served, and what is refused at start."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qwen_vllm.checkpoints.adapters import AdapterRefused, LoraAdapter, max_lora_rank


def write_adapter_dir(path: Path, weights: str = "adapter_model.safetensors", **config):
    """An adapter directory's files; the weights' content is not read here."""
    path.mkdir(parents=True)
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, **config}
    (path / "adapter_config.json").write_text(json.dumps(config))
    (path / weights).write_bytes(b"")
    return path


def test_a_peft_adapter_is_read_with_its_rank(tmp_path):
    path = write_adapter_dir(tmp_path / "sql", weights="adapter_model.bin", r=64)
    adapter = LoraAdapter.read("sql", str(path))
    assert adapter == LoraAdapter(name="sql", path=path, rank=64)


@pytest.mark.parametrize(
    ("ranks", "limit"), [([8], 8), ([4, 8], 8), ([12], 16), ([64, 1], 64), ([1], 1)]
)
def test_max_lora_rank_is_the_smallest_vllm_value_that_holds_all(ranks, limit):
    adapters = [LoraAdapter(f"a{i}", Path("/x"), r) for i, r in enumerate(ranks)]
    assert max_lora_rank(adapters) == limit


def test_an_asked_max_lora_rank_is_one_vllm_serves_and_holds_the_adapters():
    assert max_lora_rank([]) == 16  # vLLM's default, for adapters loaded later
    assert max_lora_rank([], asked=64) == 64
    with pytest.raises(AdapterRefused, match=r"--max-lora-rank 12: vLLM serves one"):
        max_lora_rank([], asked=12)
    big = LoraAdapter("big", Path("/x"), 32)
    with pytest.raises(AdapterRefused, match=r"'big'.*rank 32, more than.*16; raise"):
        max_lora_rank([big], asked=16)


def test_refusals_name_the_adapter_and_what_to_do(tmp_path):
    with pytest.raises(AdapterRefused, match=r"'gone'.*no adapter_config.json"):
        LoraAdapter.read("gone", tmp_path / "missing")

    emb = write_adapter_dir(tmp_path / "emb", modules_to_save=["wte", "lm_head"])
    merge = r"wte, lm_head.*`qwen-vllm merge-lora BASE ADAPTER OUT`"
    with pytest.raises(AdapterRefused, match=merge):
        LoraAdapter.read("emb", emb)

    prefix = write_adapter_dir(tmp_path / "prefix", peft_type="PREFIX_TUNING")
    with pytest.raises(AdapterRefused, match="not a LoRA adapter"):
        LoraAdapter.read("prefix", prefix)

    empty = write_adapter_dir(tmp_path / "empty", weights="notes.txt")
    with pytest.raises(AdapterRefused, match="no adapter_model.safetensors or"):
        LoraAdapter.read("empty", empty)

    huge = write_adapter_dir(tmp_path / "huge", r=1024)
    with pytest.raises(AdapterRefused, match="ranks 1 to 512"):
        LoraAdapter.read("huge", huge)

    broken = write_adapter_dir(tmp_path / "broken")
    (broken / "adapter_config.json").write_text("{")
    with pytest.raises(AdapterRefused, match="cannot read"):
        LoraAdapter.read("broken", broken)


@pytest.mark.slow
def test_the_worker_command_refuses_an_adapter_in_one_line(demo_dir, tmp_path):
    import subprocess

    from tests.conftest import free_port
    from tests.servers import venv_bin

    emb = write_adapter_dir(tmp_path / "emb", modules_to_save=["wte", "lm_head"])
    run = subprocess.run(
        [
            *(venv_bin("qwen-vllm"), "worker", "--model", str(demo_dir)),
            *("--lora", f"emb={emb}"),
            *("--worker-port", str(free_port())),
            *("--controller-port", str(free_port())),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 2, run.stderr[-3000:]
    assert "qwen-vllm worker: error: LoRA adapter 'emb'" in run.stderr
    assert "qwen-vllm merge-lora" in run.stderr
    assert "Traceback" not in run.stderr + run.stdout
