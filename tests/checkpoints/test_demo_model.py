import hashlib
import json

from qwen_vllm.chat.vocab import STOP_TOKEN_IDS, packaged_vocab_file
from qwen_vllm.checkpoints.demo import DemoModelSpec, write_demo_model
from qwen_vllm.cli import main as cli_main


def _digest(path):
    return {
        f.name: hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(path.iterdir())
    }


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path):
    spec = DemoModelSpec(seed=3)
    a = _digest(write_demo_model(tmp_path / "a", spec))
    b = _digest(write_demo_model(tmp_path / "b", spec))
    c = _digest(write_demo_model(tmp_path / "c", DemoModelSpec(seed=4)))
    assert a == b
    assert a["model.safetensors"] != c["model.safetensors"]


def test_layout_of_a_real_qwen_release(demo_dir):
    config = json.loads((demo_dir / "config.json").read_text())
    assert config["architectures"] == ["QWenLMHeadModel"]
    assert config["model_type"] == "qwen"
    assert "AutoConfig" in config["auto_map"]
    tok_config = json.loads((demo_dir / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == "QWenTokenizer"
    generation = json.loads((demo_dir / "generation_config.json").read_text())
    assert sorted(generation["eos_token_id"]) == [151643, 151644, 151645]
    assert sorted(STOP_TOKEN_IDS) == [151643, 151644, 151645]
    vocab = (demo_dir / "qwen.tiktoken").read_bytes()
    assert vocab == packaged_vocab_file().read_bytes()
    assert len(vocab.splitlines()) == 151643


def test_sharded_bin_layout_has_an_index(tmp_path):
    out = write_demo_model(
        tmp_path / "m", DemoModelSpec(num_shards=2, weight_format="bin")
    )
    index = json.loads((out / "pytorch_model.bin.index.json").read_text())
    files = set(index["weight_map"].values())
    assert files == {
        "pytorch_model-00001-of-00002.bin",
        "pytorch_model-00002-of-00002.bin",
    }
    assert all((out / f).is_file() for f in files)


def test_cli_writes_a_model_and_rejects_bad_flags(tmp_path, capsys):
    assert (
        cli_main(["demo-model", str(tmp_path / "m"), "--num-hidden-layers", "1"]) == 0
    )
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["num_hidden_layers"] == 1
    assert cli_main(["demo-model", str(tmp_path / "x"), "--hidden-size", "100"]) == 2
    assert "hidden_size must equal" in capsys.readouterr().err
