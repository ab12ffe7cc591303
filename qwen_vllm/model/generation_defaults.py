"""A checkpoint's generation defaults: what a request that sets nothing gets.

Qwen's own server and HF `chat()` sample with the checkpoint's
generation_config.json (the -Chat releases: top_p 0.8, top_k 0,
repetition_penalty 1.1, max_new_tokens 512, and max_window_size 6144 tokens of
history), and `vllm serve` applies the same file through
ModelConfig.get_diff_sampling_param. The worker and QwenChat read them here
from the same vLLM function, so a request answers the same on every path; a
request's own fields override them. vLLM's `generation_config` engine argument
("vllm": neutral sampling, or a directory) changes the source, as for
`vllm serve`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class GenerationDefaults:
    # SamplingParams keyword arguments (vLLM's names: top_k, top_p ...),
    # besides max_tokens.
    sampling: Mapping[str, Any] = field(default_factory=dict)
    # Tokens generated when a request does not say; None: the rest of the
    # context.
    max_new_tokens: int | None = None
    # Tokens of history kept in a chat prompt; None: 3/4 of the context,
    # Qwen's 6144 of 8192 for any context length.
    max_window_size: int | None = None

    @classmethod
    def of(cls, model_config: Any) -> GenerationDefaults:
        """The defaults of the engine's model (a vLLM ModelConfig)."""
        sampling = dict(model_config.get_diff_sampling_param())
        window = model_config.try_get_generation_config().get("max_window_size")
        return cls(
            sampling,
            sampling.pop("max_tokens", None),
            window if isinstance(window, int) and window > 0 else None,
        )

    def max_tokens(self, asked: int | None, room: int) -> int:
        """Tokens to generate: as `asked`, else the default within `room`
        (the context left after the prompt)."""
        if asked is not None:
            return asked
        return room if self.max_new_tokens is None else min(self.max_new_tokens, room)

    def window(self, context_length: int, max_tokens: int | None) -> int:
        """History kept in a chat prompt, leaving room for the answer."""
        window = self.max_window_size or context_length * 3 // 4
        answer = self.max_new_tokens if max_tokens is None else max_tokens
        return window if answer is None else min(window, context_length - answer)

    def describe(self) -> str:
        """One line for the start log."""
        values = dict(self.sampling)
        for name in ("max_new_tokens", "max_window_size"):
            if getattr(self, name) is not None:
                values[name] = getattr(self, name)
        if not values:
            return "vLLM's neutral sampling (no generation defaults in the checkpoint)"
        return ", ".join(f"{name}={value}" for name, value in sorted(values.items()))
