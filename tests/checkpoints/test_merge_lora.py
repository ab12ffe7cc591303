"""`qwen-vllm merge-lora`: the merged checkpoint against LoRA's formula applied
by the tests (tests/lora_adapters.merged), in the base's own layout."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from qwen_vllm.checkpoints.demo import write_demo_model
from qwen_vllm.cli.commands import main
from tests.conftest import WIDE_SPEC
from tests.lora_adapters import AdapterSpec, merged, write_adapter
from tests.reference_qwen import read_checkpoint

EMB = AdapterSpec(rank=8, alpha=16, rslora=True, modules_to_save=("wte", "lm_head"))


@pytest.mark.parametrize("weight_format", ["safetensors", "bin"])
def test_merged_checkpoint_is_the_base_plus_the_update_in_its_layout(
    tmp_path, capsys, weight_format
):
    spec = dataclasses.replace(WIDE_SPEC, weight_format=weight_format, num_shards=2)
    base = write_demo_model(tmp_path / "base", spec)
    adapter_spec = dataclasses.replace(EMB, safetensors=weight_format == "bin")
    adapter = write_adapter(base, tmp_path / "emb-lora", adapter_spec)
    out = tmp_path / "merged"

    assert main(["merge-lora", str(base), str(adapter), str(out)]) == 0
    printed = capsys.readouterr().out
    progress = [line for line in printed.splitlines() if line.startswith("merged ")]
    assert len(progress) == 2  # one line per weight file
    assert f"serve it with --model {out}" in printed

    # The same files; all but the weights byte for byte.
    names = sorted(p.name for p in base.iterdir())
    assert sorted(p.name for p in out.iterdir()) == names
    for name in names:
        if not name.endswith((".safetensors", ".bin")):
            assert (out / name).read_bytes() == (base / name).read_bytes(), name

    _, before = read_checkpoint(base)
    _, want = merged(base, adapter)
    _, got = read_checkpoint(out)
    assert set(got) == set(want) == set(before)
    changed = [k for k in want if not torch.equal(want[k], before[k])]
    # c_attn, c_proj (twice), w1, w2 per layer, plus the embedding and LM head.
    assert len(changed) == 5 * WIDE_SPEC.num_hidden_layers + 2
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)


def test_refusals_are_one_line_and_leave_nothing(tmp_path, capsys):
    base = write_demo_model(tmp_path / "base", WIDE_SPEC)
    adapter = write_adapter(base, tmp_path / "lora", AdapterSpec(rank=4, alpha=8))

    def refused(*args: str) -> str:
        assert main(["merge-lora", *map(str, args)]) == 2
        return capsys.readouterr().err

    taken = tmp_path / "taken"
    taken.mkdir()
    assert "exists; name a new directory" in refused(base, adapter, taken)

    other = write_demo_model(
        tmp_path / "other", dataclasses.replace(WIDE_SPEC, num_hidden_layers=2)
    )
    message = refused(other, adapter, tmp_path / "out")
    assert "weights the base does not have" in message
    assert "transformer.h.2." in message
    assert not (tmp_path / "out").exists()

    int4 = tmp_path / "int4"
    int4.mkdir()
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (int4 / "config.json").write_text(json.dumps(config))
    assert "Q-LoRA adapter cannot be merged" in refused(int4, adapter, tmp_path / "o")

    assert "no adapter_config.json" in refused(base, tmp_path, tmp_path / "o")
    assert "no config.json there" in refused(tmp_path, adapter, tmp_path / "o")
    assert not (tmp_path / "o").exists()
