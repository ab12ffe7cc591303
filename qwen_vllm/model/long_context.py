"""Qwen v1's long-context tricks on vLLM: dynamic NTK rotary scaling and logN.

Dynamic NTK: a sequence whose prompt has L tokens uses the rotary base
base * alpha ** (d / (d - 2)) with alpha = 2 ** ceil(log2(L / seq_length) + 1) - 1
(1 up to seq_length, then 3, 7, 15, ...), fixed at prefill for its whole
generation. vLLM's engine gives a model positions, not prompt lengths, so the
level of alpha travels inside the positions: vLLM's M-RoPE hook computes each
request's prompt positions once, from the whole prompt (so chunked prefill
sees the total length), and continues them during decoding with a constant
per-request offset. We make that offset level * span. The rotary cache holds
one block of `span` rows per level, so the encoded position is directly the
row to read, and the true position is position % span.

LogN: the query at position p is multiplied by max(1, ln(p + 1) / ln(seq_length)).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding


def ntk_level(prompt_len: int, seq_length: int) -> int:
    """Smallest m >= 0 with seq_length * 2**m >= prompt_len (exact integers)."""
    level = 0
    while seq_length << level < prompt_len:
        level += 1
    return level


def ntk_alpha(level: int) -> int:
    return 1 if level == 0 else 2 ** (level + 1) - 1


class NTKRotaryEmbedding(RotaryEmbedding):
    """Neox-style rotary embedding with one cos/sin block per NTK level."""

    def __init__(
        self,
        head_size: int,
        rotary_dim: int,
        span: int,
        seq_length: int,
        base: float,
        dtype: torch.dtype,
    ) -> None:
        self.span = span
        self.levels = ntk_level(span, seq_length) + 1
        super().__init__(
            head_size,
            rotary_dim,
            max_position_embeddings=span * self.levels,
            base=base,
            is_neox_style=True,
            dtype=dtype,
        )

    def _compute_cos_sin_cache(self) -> torch.Tensor:
        blocks = []
        t = torch.arange(self.span, dtype=torch.float)
        exponent = self.rotary_dim / (self.rotary_dim - 2)
        for level in range(self.levels):
            inv_freq = self._compute_inv_freq(self.base * ntk_alpha(level) ** exponent)
            freqs = torch.outer(t, inv_freq)
            blocks.append(torch.cat((freqs.cos(), freqs.sin()), dim=-1))
        return torch.cat(blocks)


class LogNScaling(nn.Module):
    """Scales queries by max(1, ln(p + 1) / ln(seq_length)) at position p."""

    def __init__(self, span: int, seq_length: int) -> None:
        super().__init__()
        scale = [max(1.0, math.log(p + 1) / math.log(seq_length)) for p in range(span)]
        self.register_buffer("scale", torch.tensor(scale), persistent=False)

    def forward(self, positions: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        factor = self.scale.index_select(0, positions).to(query.dtype)
        return query * factor.unsqueeze(-1)


def prompt_positions(prompt_len: int, span: int, seq_length: int):
    """M-RoPE hook result: (3 x L positions, per-request offset) for a prompt."""
    offset = ntk_level(prompt_len, seq_length) * span
    positions = torch.arange(prompt_len, dtype=torch.long) + offset
    return positions.unsqueeze(0).expand(3, -1).clone(), offset
