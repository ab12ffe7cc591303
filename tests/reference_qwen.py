"""An independent Qwen v1 forward pass: the oracle the plugin is checked against.

Written from the published architecture and formulas, in float64, with dense
causal attention and no KV cache: every step recomputes the whole sequence.
It reads checkpoints on its own (no qwen_vllm code), so a loading bug in the
plugin cannot hide behind the same bug here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

_NAMES = {  # GPT-2 style names of the first Qwen-7B-Chat release
    "n_embd": "hidden_size",
    "n_layer": "num_hidden_layers",
    "n_head": "num_attention_heads",
    "ffn_hidden_size": "intermediate_size",
    "n_positions": "max_position_embeddings",
}


def read_checkpoint(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    for old, new in _NAMES.items():
        if old in config:
            config[new] = config.pop(old)
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            weights.update(load_file(file))
        else:
            weights.update(torch.load(file, map_location="cpu", weights_only=True))
    return config, {k: v.to(torch.float64) for k, v in weights.items()}


def ntk_alpha(prompt_len: int, seq_length: int) -> int:
    context_value = math.log2(prompt_len / seq_length) + 1
    return max(1, 2 ** math.ceil(context_value) - 1)


class ReferenceQwenV1:
    def __init__(self, config: dict, weights: dict[str, torch.Tensor]) -> None:
        self.c = config
        self.w = weights
        self.heads = config["num_attention_heads"]
        self.head_dim = config["kv_channels"]
        self.rot_dim = int(self.head_dim * config.get("rotary_pct", 1.0))
        self.eps = config.get("layer_norm_epsilon", 1e-6)

    @classmethod
    def from_dir(cls, path: str | Path) -> ReferenceQwenV1:
        return cls(*read_checkpoint(path))

    def _rms(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return (
            x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.w[name]
        )

    def _rope(self, x: torch.Tensor, base: float) -> torch.Tensor:
        # x: [T, heads, head_dim]; rotate-half over the first rot_dim dims.
        d = self.rot_dim
        inv_freq = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        angles = torch.outer(torch.arange(x.shape[0], dtype=torch.float64), inv_freq)
        cos = torch.cat([angles.cos()] * 2, -1)[:, None, :]
        sin = torch.cat([angles.sin()] * 2, -1)[:, None, :]
        rot, rest = x[..., :d], x[..., d:]
        half = d // 2
        rotated = torch.cat([-rot[..., half:], rot[..., :half]], -1)
        return torch.cat([rot * cos + rotated * sin, rest], -1)

    def logits(
        self, ids: list[int], prompt_len: int | None = None, last_only: bool = False
    ) -> torch.Tensor:
        """Logits at every position (or the last); prompt_len fixes the NTK alpha."""
        c, w = self.c, self.w
        T = len(ids)
        seq_length = c["seq_length"]
        base = float(c.get("rotary_emb_base", 10000))
        if c.get("use_dynamic_ntk"):
            alpha = ntk_alpha(prompt_len or T, seq_length)
            base = base * alpha ** (self.rot_dim / (self.rot_dim - 2))
        x = w["transformer.wte.weight"][torch.tensor(ids)]
        mask = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)
        logn = torch.tensor(
            [max(1.0, math.log(p + 1) / math.log(seq_length)) for p in range(T)],
            dtype=torch.float64,
        )[:, None, None]
        for i in range(c["num_hidden_layers"]):
            p = f"transformer.h.{i}"
            h = self._rms(x, f"{p}.ln_1.weight")
            qkv = h @ w[f"{p}.attn.c_attn.weight"].T + w[f"{p}.attn.c_attn.bias"]
            q, k, v = (t.view(T, self.heads, self.head_dim) for t in qkv.chunk(3, -1))
            q, k = self._rope(q, base), self._rope(k, base)
            if c.get("use_logn_attn"):
                q = q * logn
            scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(self.head_dim)
            probs = torch.softmax(scores + mask, -1)
            attn = torch.einsum("hqk,khd->qhd", probs, v).reshape(T, -1)
            x = x + attn @ w[f"{p}.attn.c_proj.weight"].T
            h = self._rms(x, f"{p}.ln_2.weight")
            up = h @ w[f"{p}.mlp.w1.weight"].T
            gate = h @ w[f"{p}.mlp.w2.weight"].T
            x = (
                x
                + (up * torch.nn.functional.silu(gate)) @ w[f"{p}.mlp.c_proj.weight"].T
            )
        x = self._rms(x[-1:] if last_only else x, "transformer.ln_f.weight")
        return x @ w["lm_head.weight"].T

    def greedy(self, prompt: list[int], steps: int) -> tuple[list[int], list[float]]:
        """Greedy continuation and the log-probability of each chosen token."""
        ids = list(prompt)
        chosen: list[float] = []
        for _ in range(steps):
            logits = self.logits(ids, len(prompt), last_only=True)[-1]
            logprobs = torch.log_softmax(logits, -1)
            token = int(logprobs.argmax())
            chosen.append(float(logprobs[token]))
            ids.append(token)
        return ids[len(prompt) :], chosen
