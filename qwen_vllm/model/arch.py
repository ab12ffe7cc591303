"""How vLLM reads a Qwen v1 config: validation, context length, engine options."""

from __future__ import annotations

import logging

from vllm.config import VllmConfig
from vllm.model_executor.models.config import VerifyAndUpdateConfig
from vllm.transformers_utils.model_arch_config_convertor import (
    ModelArchConfigConvertorBase,
)

logger = logging.getLogger(__name__)


class QWenArchConfigConvertor(ModelArchConfigConvertorBase):
    def convert(self, supports_multimodal: bool = True):
        # Runs in the front end while vLLM builds its ModelConfig, so an
        # unservable checkpoint fails before any engine process starts.
        self.hf_config.check_servable()
        return super().convert(supports_multimodal)

    def derive_max_model_len_and_key(self) -> tuple[float, str | None]:
        # vLLM would take the smallest of seq_length and max_position_embeddings;
        # the checkpoint's own settings decide instead (see QWenConfig).
        config = self.hf_config
        key = (
            "max_position_embeddings"
            if config.max_context_length == config.max_position_embeddings
            else "seq_length"
        )
        return config.max_context_length, key


class QWenConfigHook(VerifyAndUpdateConfig):
    """Adjusts vLLM's engine config for a Qwen v1 checkpoint."""

    @staticmethod
    def verify_and_update_config(vllm_config: VllmConfig) -> None:
        hf_config = vllm_config.model_config.hf_config
        long_prompts = vllm_config.model_config.max_model_len > hf_config.seq_length
        cache = vllm_config.cache_config
        if hf_config.use_dynamic_ntk and long_prompts and cache.enable_prefix_caching:
            # Keys cached for one prompt length were rotated with that length's
            # NTK alpha; another prompt sharing the prefix may need another.
            logger.warning(
                "Prefix caching is off: with dynamic NTK the rotary base depends "
                "on each prompt's length (max_model_len %d > seq_length %d). "
                "Serve with --max-model-len %d to keep prefix caching.",
                vllm_config.model_config.max_model_len,
                hf_config.seq_length,
                hf_config.seq_length,
            )
            cache.enable_prefix_caching = False
