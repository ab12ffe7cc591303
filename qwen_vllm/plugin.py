"""vLLM general plugin: teaches vLLM the Qwen v1 architecture.

vLLM calls `register()` in every process it starts (API server, engine core,
each tensor-parallel worker), so it must be cheap and idempotent. This module
imports only the standard library: vLLM swallows import errors of plugins into
a log line, and the user would then only see "architecture not supported".
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

ARCHITECTURE = "QWenLMHeadModel"
MODEL_TYPE = "qwen"
MODEL_CLASS = "qwen_vllm.model.qwen:QWenLMHeadModel"

_registered = False


def register() -> None:
    """Register the Qwen v1 config, tokenizer and model with vLLM."""
    global _registered
    if _registered:
        return
    try:
        _register_config_and_tokenizer()
        _register_model()
    except Exception as exc:
        # vLLM would otherwise go on and later report a baffling
        # "architecture not supported" for every Qwen v1 checkpoint.
        raise RuntimeError(
            f"qwen_vllm could not register the Qwen v1 architecture with vLLM: "
            f"{exc!r}. Check that the installed vLLM matches the version qwen_vllm "
            "pins (see README), or exclude this plugin with "
            "VLLM_PLUGINS=<other plugins>."
        ) from exc
    _registered = True


def _register_config_and_tokenizer() -> None:
    from transformers import AutoConfig, AutoTokenizer

    from qwen_vllm.chat.tokenizer import QWenTokenizer
    from qwen_vllm.model.config import QWenConfig

    AutoConfig.register(MODEL_TYPE, QWenConfig, exist_ok=True)
    AutoTokenizer.register(QWenConfig, tokenizer_class=QWenTokenizer, exist_ok=True)
    try:
        import vllm.config  # noqa: F401  (imports the modules below in a safe order)
    except ImportError:  # transformers alone: nothing more to register
        return
    from vllm.transformers_utils import config as vllm_config

    # A model_type in vLLM's own registry no longer counts as remote code, so
    # real checkpoints (which carry auto_map) load without trust_remote_code.
    vllm_config._CONFIG_REGISTRY[MODEL_TYPE] = QWenConfig

    from vllm.model_executor.models.config import MODELS_CONFIG_MAP
    from vllm.transformers_utils import model_arch_config_convertor as convertors

    from qwen_vllm.model.hooks import QWenArchConfigConvertor, QWenConfigHook

    convertors.MODEL_ARCH_CONFIG_CONVERTORS[MODEL_TYPE] = QWenArchConfigConvertor
    MODELS_CONFIG_MAP[ARCHITECTURE] = QWenConfigHook


def _register_model() -> None:
    try:
        from vllm import ModelRegistry
    except ImportError:
        return
    ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
    _add_chatml_stop_ids()
    _render_chat_to_token_ids()
    _register_tool_parser()
    _install_cpu_lora_ops()


def _install_cpu_lora_ops() -> None:
    # vLLM 0.32's CPU LoRA ops give a request without an adapter the last
    # adapter's update when they share a batch, and copy each token's adapter
    # matrices (see model/cpu_lora.py).
    from qwen_vllm.model import cpu_lora

    cpu_lora.patch()


def _register_tool_parser() -> None:
    # `vllm serve --enable-auto-tool-choice --tool-call-parser qwen-react`
    from vllm.tool_parsers.abstract_tool_parser import ToolParserManager

    ToolParserManager.register_lazy_module(
        "qwen-react", "qwen_vllm.model.tool_parser", "QwenReactToolParser"
    )


def _render_chat_to_token_ids() -> None:
    # The "hf" renderer serves every model with a Hugging Face tokenizer; ours
    # differs from vLLM's only for Qwen v1 tokenizers (see model/renderer.py).
    from vllm.renderers.registry import RENDERER_REGISTRY

    RENDERER_REGISTRY.renderers["hf"] = (
        "qwen_vllm.model.renderer",
        "QwenAwareHfRenderer",
    )


def _add_chatml_stop_ids() -> None:
    """Make vLLM stop on the ChatML tokens for every Qwen v1 checkpoint.

    vLLM takes extra stop ids only from generation_config.json, and real Qwen
    v1 releases list just <|endoftext|> there (their own chat() added the
    others in code), so without this every chat would run to max_tokens.
    """
    from vllm.config.model import ModelConfig

    original = ModelConfig.try_get_generation_config
    if getattr(original, "_qwen_vllm", False):
        return

    def try_get_generation_config(self: ModelConfig) -> dict:
        config = original(self)
        if getattr(self.hf_config, "model_type", None) != MODEL_TYPE:
            return config
        from qwen_vllm.chat.vocab import with_chatml_stops

        eos = config.get("eos_token_id")
        ids = [eos] if isinstance(eos, int) else list(eos or [])
        config["eos_token_id"] = with_chatml_stops(ids)
        return config

    try_get_generation_config._qwen_vllm = True  # type: ignore[attr-defined]
    ModelConfig.try_get_generation_config = try_get_generation_config
