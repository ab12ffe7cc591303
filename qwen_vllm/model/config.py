"""Qwen v1 configuration, readable without the checkpoint's remote code."""

from __future__ import annotations

import logging
from typing import Any

from transformers import PretrainedConfig

# Read the same way by the pure-Python checks of qwen_vllm.model.sizes.
from qwen_vllm.model.sizes import DEFAULTS, GPT2_STYLE_NAMES

logger = logging.getLogger(__name__)

# Fields that would change the forward pass in ways this implementation does
# not reproduce. Each maps to the only value we accept (None: must be absent).
_UNSERVABLE_FIELDS: dict[str, Any] = {
    "visual": None,  # Qwen-VL: a vision tower we do not implement
    "rope_scaling": None,  # Qwen v1 scales RoPE through use_dynamic_ntk instead
    "apply_residual_connection_post_layernorm": False,
    "scale_attn_weights": True,
    "no_bias": True,
    "hidden_act": "silu",
    "activation": "swiglu",
    "num_key_value_heads": "num_attention_heads",
}


# Dynamic NTK reads up to four times the training length (alpha 7), and no
# Qwen v1 release states a context longer than 32K.
NTK_REACH = 4
LONGEST_STATED_CONTEXT = 32768


class QWenConfig(PretrainedConfig):
    model_type = "qwen"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, **kwargs: Any) -> None:
        for old, new in GPT2_STYLE_NAMES.items():
            if old in kwargs:
                kwargs.setdefault(new, kwargs.pop(old))
        # 72B sets rope_theta next to rotary_emb_base; both mean the same.
        if "rope_theta" in kwargs:
            kwargs["rotary_emb_base"] = kwargs.pop("rope_theta")
        for name, default in DEFAULTS.items():
            setattr(self, name, kwargs.pop(name, default))
        # A checkpoint may state its own limit; none of Qwen's releases does.
        self._stated_max_length: int | None = kwargs.pop("model_max_length", None)
        self.head_dim = self.kv_channels
        # Checked when loading: transformers would turn some of these (e.g.
        # rope_scaling) into its own fields before we could see them.
        self._check_fields({k: kwargs[k] for k in _UNSERVABLE_FIELDS if k in kwargs})
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)
        self.check_servable()
        if self.use_dynamic_ntk:
            # Declaring an M-RoPE section makes vLLM ask the model for each
            # request's prompt positions, the channel that carries the
            # request's NTK level (see qwen_vllm/model/long_context.py).
            self.rope_parameters = {
                "rope_type": "default",
                "rope_theta": self.rotary_emb_base,
                "partial_rotary_factor": self.rotary_pct,
                "mrope_section": [self.rotary_dim // 2],
            }

    def _check_fields(self, fields: dict[str, Any]) -> None:
        for key, value in fields.items():
            allowed = _UNSERVABLE_FIELDS[key]
            if allowed == "num_attention_heads":
                allowed = self.num_attention_heads
            if value != allowed:
                expected = "absent" if allowed is None else f"{allowed!r}"
                raise ValueError(
                    f"Qwen v1 config field {key!r}={value!r} is not supported by "
                    f"qwen_vllm (expected {expected}); this checkpoint is not a "
                    "plain Qwen v1 language model."
                )

    def check_servable(self) -> None:
        """Raise ValueError naming a field whose value this plugin cannot serve."""
        if self.kv_channels * self.num_attention_heads != self.hidden_size:
            raise ValueError(
                "Qwen v1 config: hidden_size must equal kv_channels * "
                f"num_attention_heads ({self.kv_channels} * "
                f"{self.num_attention_heads} = "
                f"{self.kv_channels * self.num_attention_heads}), "
                f"not {self.hidden_size}."
            )
        if self.intermediate_size % 2:
            raise ValueError(
                f"Qwen v1 config field 'intermediate_size'={self.intermediate_size} "
                "must be even: it is twice the MLP width."
            )
        if not 0.0 < self.rotary_pct <= 1.0:
            raise ValueError(
                f"Qwen v1 config field 'rotary_pct'={self.rotary_pct} "
                "must be in (0, 1]."
            )
        rotary_dim = int(self.kv_channels * self.rotary_pct)
        if rotary_dim % 2:
            raise ValueError(
                f"Qwen v1 config field 'rotary_pct'={self.rotary_pct} gives an odd "
                f"rotary dimension {rotary_dim}."
            )
        if self.seq_length <= 0 or self.max_position_embeddings <= 0:
            raise ValueError(
                "Qwen v1 config fields 'seq_length' and 'max_position_embeddings' "
                "must be positive."
            )

    @property
    def mlp_width(self) -> int:
        # Qwen v1 stores twice the real width (w1 and w2 each have half).
        return self.intermediate_size // 2

    @property
    def rotary_dim(self) -> int:
        return int(self.kv_channels * self.rotary_pct)

    @property
    def max_context_length(self) -> int:
        """The longest context the checkpoint can serve with its own settings.

        Dynamic NTK is what lets Qwen v1 read past its training length; with it
        off, positions past seq_length are out of distribution.
        """
        if self.use_dynamic_ntk:
            return max(self.seq_length, self.max_position_embeddings)
        return min(self.seq_length, self.max_position_embeddings)

    @property
    def model_max_length(self) -> int:
        """The longest max_model_len a user may ask for; the default stays
        max_context_length. vLLM accepts an explicit max_model_len above the
        length it derives up to a config's `model_max_length`.

        With dynamic NTK: four times seq_length, at most 32K and never less
        than max_context_length. That is Qwen's stated context of each release:
        1.8B 32K (seq_length = max_position_embeddings = 8192), 7B 32K, 14B 8K
        (seq_length 2048), 72B 32K.
        """
        if self._stated_max_length is not None:
            return self._stated_max_length
        if not self.use_dynamic_ntk:
            return self.max_context_length
        reach = min(NTK_REACH * self.seq_length, LONGEST_STATED_CONTEXT)
        return max(self.max_context_length, reach)
