"""Qwen v1 (QWenLMHeadModel) for vLLM's V1 engine.

Module names follow the HF checkpoint (transformer.h.N.attn.c_attn, ...) so
weights map by name; the fused c_attn and the two MLP inputs go through vLLM's
parallel layers, which shard them per tensor-parallel rank.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

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
from vllm.model_executor.models.interfaces import SupportsMRoPE, SupportsQuant
from vllm.model_executor.models.utils import make_layers, maybe_prefix
from vllm.sequence import IntermediateTensors

from qwen_vllm.model.config import QWenConfig
from qwen_vllm.model.long_context import (
    LogNScaling,
    NTKRotaryEmbedding,
    prompt_positions,
)


@dataclass(frozen=True)
class LongContext:
    """How attention reads positions past the training length (seq_length)."""

    span: int  # rows of the rotary cache per NTK level: the max model length
    seq_length: int
    dynamic_ntk: bool
    logn: LogNScaling | None

    @classmethod
    def for_model(cls, config: QWenConfig, max_model_len: int) -> LongContext | None:
        if max_model_len <= config.seq_length:
            return None  # both tricks are the identity within seq_length
        logn = None
        if config.use_logn_attn:
            logn = LogNScaling(max_model_len, config.seq_length)
        return cls(max_model_len, config.seq_length, config.use_dynamic_ntk, logn)


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
        long_context: LongContext | None,
        cache_config: CacheConfig | None,
        quant_config: QuantizationConfig | None,
        prefix: str,
    ) -> None:
        super().__init__()
        self.long_context = long_context
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
        if long_context is not None and long_context.dynamic_ntk:
            self.rotary_emb = NTKRotaryEmbedding(
                head_dim,
                int(head_dim * rotary_pct),
                span=long_context.span,
                seq_length=long_context.seq_length,
                base=rope_base,
                dtype=torch.get_default_dtype(),
            )
        else:
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
        long_context = self.long_context
        if long_context is not None and long_context.logn is not None:
            if long_context.dynamic_ntk:
                positions = positions % long_context.span  # drop the NTK level
            q = long_context.logn(positions, q)
        out, _ = self.c_proj(self.attn(q, k, v))
        return out


class QWenBlock(nn.Module):
    def __init__(
        self,
        config: QWenConfig,
        long_context: LongContext | None,
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
            long_context=long_context,
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
        long_context = LongContext.for_model(
            config, vllm_config.model_config.max_model_len
        )
        self.wte = VocabParallelEmbedding(
            config.vocab_size,
            config.hidden_size,
            quant_config=quant_config,
            prefix=f"{prefix}.wte",
        )
        _, _, self.h = make_layers(
            config.num_hidden_layers,
            lambda prefix: QWenBlock(
                config, long_context, cache_config, quant_config, prefix
            ),
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
        if positions.dim() == 2:
            # M-RoPE layout (dynamic NTK): identical rows, see long_context.py.
            positions = positions[0]
        hidden = inputs_embeds if inputs_embeds is not None else self.wte(input_ids)
        residual = None
        for block in self.h:
            hidden, residual = block(positions, hidden, residual)
        hidden, _ = self.ln_f(hidden, residual)
        return hidden


class QWenLMHeadModel(nn.Module, SupportsQuant, SupportsMRoPE):
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
        self.max_model_len = vllm_config.model_config.max_model_len

    def get_mrope_input_positions(self, input_tokens, mm_features):
        """Prompt positions carrying the request's NTK level (long_context.py)."""
        if not self.config.use_dynamic_ntk:
            raise RuntimeError("M-RoPE positions are only used with dynamic NTK")
        return prompt_positions(
            len(input_tokens), self.max_model_len, self.config.seq_length
        )

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
            if name.endswith(".g_idx") and not self._wants(params, name):
                continue  # GPTQ without act-order: vLLM needs no group index
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

    def _wants(self, params: dict[str, nn.Parameter], ckpt_name: str) -> bool:
        """Whether some parameter takes this checkpoint tensor."""
        for ckpt_part, param_part, _ in self.stacked_params_mapping:
            if ckpt_part + "." in ckpt_name:
                return ckpt_name.replace(ckpt_part + ".", param_part + ".") in params
        return ckpt_name in params

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
