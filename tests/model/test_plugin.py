import subprocess
import sys
from importlib.metadata import entry_points

import pytest
from transformers import AutoConfig, AutoTokenizer

from qwen_vllm import plugin
from qwen_vllm.model.config import QWenConfig


def test_entry_point_is_the_lazy_register_function():
    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps["qwen_v1"] == "qwen_vllm.plugin:register"


def test_plugin_module_imports_nothing_heavy():
    code = (
        "import sys, qwen_vllm.plugin\n"
        "heavy = [m for m in ('vllm', 'torch', 'transformers') if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == ""


def test_register_is_idempotent_and_resolves_to_our_class():
    from vllm.model_executor.models.registry import ModelRegistry

    plugin.register()
    plugin.register()
    from qwen_vllm.model.qwen import QWenLMHeadModel

    assert ModelRegistry._try_load_model_cls(plugin.ARCHITECTURE) is QWenLMHeadModel


def test_checkpoint_with_auto_map_loads_without_remote_code(demo_dir):
    plugin.register()
    config = AutoConfig.from_pretrained(demo_dir, trust_remote_code=False)
    assert type(config) is QWenConfig
    tokenizer = AutoTokenizer.from_pretrained(demo_dir, trust_remote_code=False)
    assert type(tokenizer).__name__ == "QWenTokenizer"

    from vllm.transformers_utils.config import get_config

    assert type(get_config(str(demo_dir), trust_remote_code=False)) is QWenConfig


def test_a_failing_registration_is_loud(monkeypatch):
    def broken() -> None:
        raise ImportError("vllm.model_executor.models moved")

    monkeypatch.setattr(plugin, "_registered", False)
    monkeypatch.setattr(plugin, "_register_model", broken)
    with pytest.raises(RuntimeError, match="could not register the Qwen v1"):
        plugin.register()
    assert plugin._registered is False
