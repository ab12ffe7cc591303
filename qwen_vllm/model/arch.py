"""How vLLM reads a Qwen v1 config: validation and the context length."""

from __future__ import annotations

from vllm.transformers_utils.model_arch_config_convertor import (
    ModelArchConfigConvertorBase,
)


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
