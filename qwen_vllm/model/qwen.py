"""Qwen v1 (QWenLMHeadModel) for vLLM's V1 engine.

Module names follow the HF checkpoint (transformer.h.N.attn.c_attn, ...) so
weights map by name; the fused c_attn and the two MLP inputs go through vLLM's
parallel layers, which shard them per tensor-parallel rank.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import CacheConfig, VllmConfig
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import (
    ParallelLMHead,
    VocabParallelEmbedding,
)
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import SupportsQuant
from vllm.model_executor.models.utils import make_layers, maybe_prefix
from vllm.sequence import IntermediateTensors

from qwen_vllm.config import QWenConfig


class QWenMLP(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        width: int,
        quant_config: QuantizationConfig | None,
        prefix: str,
    ) -> None:
        super().__init__()
        # Shard 0 is the gate (checkpoint w2), shard 1 the up projection (w1):
        # Qwen v1 computes c_proj(w1(x) * silu(w2(x))).
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden_size,
            [width, width],
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.gate_up_proj",
        )
        self.c_proj = RowParallelLinear(
            width,
            hidden_size,
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.c_proj",
        )
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(x)
        out, _ = self.c_proj(self.act_fn(gate_up))
        return out


class QWenAttention(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int,
        rotary_pct: float,
        rope_base: float,
        max_position: int,
        cache_config: CacheConfig | None,
        quant_config: QuantizationConfig | None,
        prefix: str,
    ) -> None:
        super().__init__()
        self.c_attn = QKVParallelLinear(
            hidden_size,
            head_dim,
            num_heads,
            bias=True,
            quant_config=quant_config,
            prefix=f"{prefix}.c_attn",
        )
        self.c_proj = RowParallelLinear(
            num_heads * head_dim,
            hidden_size,
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.c_proj",
        )
        self.rotary_emb = get_rope(
            head_dim,
            max_position=max_position,
            is_neox_style=True,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": rope_base,
                "partial_rotary_factor": rotary_pct,
            },
        )
        local_heads = self.c_attn.num_heads
        self.q_size = local_heads * head_dim
        self.attn = Attention(
            local_heads,
            head_dim,
            head_dim**-0.5,
            num_kv_heads=self.c_attn.num_kv_heads,
            cache_config=cache_config,
            quant_config=quant_config,
            prefix=f"{prefix}.attn",
        )

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.c_attn(hidden)
        q, k, v = qkv.split([self.q_size] * 3, dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        out, _ = self.c_proj(self.attn(q, k, v))
        return out


class QWenBlock(nn.Module):
    def __init__(
        self,
        config: QWenConfig,
        cache_config: CacheConfig | None,
        quant_config: QuantizationConfig | None,
        prefix: str,
    ) -> None:
        super().__init__()
        eps = config.layer_norm_epsilon
        self.ln_1 = RMSNorm(config.hidden_size, eps=eps)
        self.attn = QWenAttention(
            hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads,
            head_dim=config.kv_channels,
            rotary_pct=config.rotary_pct,
            rope_base=config.rotary_emb_base,
            max_position=config.max_position_embeddings,
            cache_config=cache_config,
            quant_config=quant_config,
            prefix=f"{prefix}.attn",
        )
        self.ln_2 = RMSNorm(config.hidden_size, eps=eps)
        self.mlp = QWenMLP(
            config.hidden_size,
            config.mlp_width,
            quant_config=quant_config,
            prefix=f"{prefix}.mlp",
        )

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            hidden = self.ln_1(hidden)
        else:
            hidden, residual = self.ln_1(hidden, residual)
        hidden = self.attn(positions, hidden)
        hidden, residual = self.ln_2(hidden, residual)
        return self.mlp(hidden), residual


@support_torch_compile(
    dynamic_arg_dims={
        "input_ids": 0,
        "positions": -1,
        "intermediate_tensors": 0,
        "inputs_embeds": 0,
    }
)
class QWenModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config: QWenConfig = vllm_config.model_config.hf_config
        config.check_servable()
        cache_config = vllm_config.cache_config
        quant_config = vllm_config.quant_config
        self.wte = VocabParallelEmbedding(
            config.vocab_size,
            config.hidden_size,
            quant_config=quant_config,
            prefix=f"{prefix}.wte",
        )
        _, _, self.h = make_layers(
            config.num_hidden_layers,
            lambda prefix: QWenBlock(config, cache_config, quant_config, prefix),
            prefix=f"{prefix}.h",
        )
        self.ln_f = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.wte(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden = inputs_embeds if inputs_embeds is not None else self.wte(input_ids)
        residual = None
        for block in self.h:
            hidden, residual = block(positions, hidden, residual)
        hidden, _ = self.ln_f(hidden, residual)
        return hidden


class QWenLMHeadModel(nn.Module, SupportsQuant):
    # Checkpoint weight suffix -> (parameter suffix, shard id). c_attn is fused
    # q|k|v on disk; shard None lets the QKV layer split it per rank.
    stacked_params_mapping = (
        (".attn.c_attn", ".attn.c_attn", None),
        (".mlp.w2", ".mlp.gate_up_proj", 0),
        (".mlp.w1", ".mlp.gate_up_proj", 1),
    )
    packed_modules_mapping = {"gate_up_proj": ["w2", "w1"]}

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config: QWenConfig = vllm_config.model_config.hf_config
        quant_config = vllm_config.quant_config
        self.config = config
        self.transformer = QWenModel(
            vllm_config=vllm_config, prefix=maybe_prefix(prefix, "transformer")
        )
        self.lm_head = ParallelLMHead(
            config.vocab_size,
            config.hidden_size,
            quant_config=quant_config,
            prefix=maybe_prefix(prefix, "lm_head"),
        )
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.transformer.wte)
        self.logits_processor = LogitsProcessor(config.vocab_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.transformer.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.transformer(
            input_ids, positions, intermediate_tensors, inputs_embeds
        )

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        shards: dict[str, set[int | None]] = {}
        for name, tensor in weights:
            if name.endswith("rotary_emb.inv_freq"):
                continue  # recomputed from the config
            if self.config.tie_word_embeddings and name.startswith("lm_head."):
                continue
            for ckpt_part, param_part, shard_id in self.stacked_params_mapping:
                if ckpt_part + "." not in name:
                    continue
                param_name = name.replace(ckpt_part + ".", param_part + ".")
                param = _checkpoint_param(params, param_name, name)
                param.weight_loader(param, tensor, shard_id)
                shards.setdefault(param_name, set()).add(shard_id)
                break
            else:
                param_name = name
                param = _checkpoint_param(params, name, name)
                loader = getattr(param, "weight_loader", default_weight_loader)
                loader(param, tensor)
            loaded.add(param_name)
        missing = sorted(self._missing_checkpoint_names(params, loaded, shards))
        if missing:
            raise ValueError(f"The Qwen v1 checkpoint is missing weights: {missing}")
        return loaded

    def _missing_checkpoint_names(
        self,
        params: dict[str, nn.Parameter],
        loaded: set[str],
        shards: dict[str, set[int | None]],
    ) -> Iterable[str]:
        for param_name in params:
            stacked = [
                (ckpt_part, param_part, shard_id)
                for ckpt_part, param_part, shard_id in self.stacked_params_mapping
                if param_part + "." in param_name
            ]
            if not stacked:
                if param_name not in loaded:
                    yield param_name
                continue
            seen = shards.get(param_name, set())
            for ckpt_part, param_part, shard_id in stacked:
                if shard_id not in seen:
                    yield param_name.replace(param_part + ".", ckpt_part + ".")


def _checkpoint_param(params: dict[str, nn.Parameter], name: str, ckpt_name: str):
    if name not in params:
        raise ValueError(
            f"Unexpected weight {ckpt_name!r} in the Qwen v1 checkpoint: qwen_vllm "
            "has no parameter for it. Is this a Qwen v1 (QWenLMHeadModel) "
            "checkpoint?"
        )
    return params[name]
