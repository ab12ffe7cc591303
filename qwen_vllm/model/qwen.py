"""Qwen v1 (QWenLMHeadModel) for vLLM's V1 engine.

The module tree uses vLLM's names (model.layers.N.self_attn.qkv_proj, ...);
CHECKPOINT_NAMES maps the HF checkpoint's names (transformer.h.N.attn.c_attn,
...) onto them, and vLLM's AutoWeightsLoader fills the parameters. The fused
qkv_proj and gate_up_proj are vLLM's parallel layers, which shard them per
tensor-parallel rank.
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
from vllm.model_executor.models.interfaces import (
    SupportsLoRA,
    SupportsMRoPE,
    SupportsQuant,
)
from vllm.model_executor.models.utils import (
    AutoWeightsLoader,
    WeightsMapper,
    make_layers,
    maybe_prefix,
)
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
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden_size,
            [width, width],
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.gate_up_proj",
        )
        self.down_proj = RowParallelLinear(
            width,
            hidden_size,
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.down_proj",
        )
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(x)
        out, _ = self.down_proj(self.act_fn(gate_up))
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
        self.qkv_proj = QKVParallelLinear(
            hidden_size,
            head_dim,
            num_heads,
            bias=True,
            quant_config=quant_config,
            prefix=f"{prefix}.qkv_proj",
        )
        self.o_proj = RowParallelLinear(
            num_heads * head_dim,
            hidden_size,
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.o_proj",
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
        local_heads = self.qkv_proj.num_heads
        self.q_size = local_heads * head_dim
        self.attn = Attention(
            local_heads,
            head_dim,
            head_dim**-0.5,
            num_kv_heads=self.qkv_proj.num_kv_heads,
            cache_config=cache_config,
            quant_config=quant_config,
            prefix=f"{prefix}.attn",
        )

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden)
        q, k, v = qkv.split([self.q_size] * 3, dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        long_context = self.long_context
        if long_context is not None and long_context.logn is not None:
            if long_context.dynamic_ntk:
                positions = positions % long_context.span  # drop the NTK level
            q = long_context.logn(positions, q)
        out, _ = self.o_proj(self.attn(q, k, v))
        return out


class QWenDecoderLayer(nn.Module):
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
        self.input_layernorm = RMSNorm(config.hidden_size, eps=eps)
        self.self_attn = QWenAttention(
            hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads,
            head_dim=config.kv_channels,
            rotary_pct=config.rotary_pct,
            rope_base=config.rotary_emb_base,
            max_position=config.max_position_embeddings,
            long_context=long_context,
            cache_config=cache_config,
            quant_config=quant_config,
            prefix=f"{prefix}.self_attn",
        )
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=eps)
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
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
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
        cache_config = vllm_config.cache_config
        quant_config = vllm_config.quant_config
        long_context = LongContext.for_model(
            config, vllm_config.model_config.max_model_len
        )
        self.embed_tokens = VocabParallelEmbedding(
            config.vocab_size,
            config.hidden_size,
            quant_config=quant_config,
            prefix=f"{prefix}.embed_tokens",
        )
        _, _, self.layers = make_layers(
            config.num_hidden_layers,
            lambda prefix: QWenDecoderLayer(
                config, long_context, cache_config, quant_config, prefix
            ),
            prefix=f"{prefix}.layers",
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

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
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        hidden, residual = inputs_embeds, None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


# The HF checkpoint's names -> this module tree's. Qwen v1 computes
# c_proj(w1(x) * silu(w2(x))): w2 is the gate (shard 0 of gate_up_proj), w1
# the up projection (shard 1). c_attn is q|k|v fused on disk, as qkv_proj is.
# Substrings carry no trailing dot: vLLM maps module names (a quantization
# config's layer list) with this mapper as well as tensor names.
_PREFIXES = {"transformer.": "model."}
_RENAMED = {
    ".wte": ".embed_tokens",
    ".h.": ".layers.",
    ".ln_1": ".input_layernorm",
    ".attn.c_attn": ".self_attn.qkv_proj",
    ".attn.c_proj": ".self_attn.o_proj",
    ".ln_2": ".post_attention_layernorm",
    ".mlp.c_proj": ".mlp.down_proj",
    ".ln_f": ".norm",
}
_STACKED = {
    ".mlp.w2": (".mlp.gate_up_proj", 0),
    ".mlp.w1": (".mlp.gate_up_proj", 1),
}
CHECKPOINT_NAMES = WeightsMapper(
    orig_to_new_prefix=_PREFIXES,
    orig_to_new_substr=_RENAMED,
    orig_to_new_stacked=_STACKED,
)
# Tensors a checkpoint may carry that the model recomputes or does not need.
_DROPPED = AutoWeightsLoader.REMOVE_UNUSED_ROTARY_EMBEDS_MAPPER
_KNOWN_NAMES = CHECKPOINT_NAMES | _DROPPED


def checkpoint_names(param_name: str) -> list[str]:
    """The checkpoint tensors that fill one parameter (CHECKPOINT_NAMES inverted)."""
    name = param_name
    for ckpt, ours in _PREFIXES.items():
        if name.startswith(ours):
            name = ckpt + name[len(ours) :]
    for ckpt, ours in _RENAMED.items():
        name = name.replace(ours, ckpt, 1)
    stacked = [
        name.replace(fused, ckpt, 1)
        for ckpt, (fused, _) in _STACKED.items()
        if fused in name
    ]
    return stacked or [name]


class QWenLMHeadModel(nn.Module, SupportsLoRA, SupportsQuant, SupportsMRoPE):
    # LoRA adapters name modules as the checkpoint does; vLLM renames them with
    # this mapper (without the stacking) and packs w2 and w1 into gate_up_proj.
    # c_attn is one module on disk and here: qkv_proj packs only itself, which
    # is what makes vLLM wrap it with its fused-QKV LoRA layer (q|k|v in one
    # update, split per rank as the weight is).
    hf_to_vllm_mapper = CHECKPOINT_NAMES
    packed_modules_mapping = {"qkv_proj": ["qkv_proj"], "gate_up_proj": ["w2", "w1"]}

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config: QWenConfig = vllm_config.model_config.hf_config
        quant_config = vllm_config.quant_config
        self.config = config
        self.model = QWenModel(
            vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model")
        )
        self.lm_head = ParallelLMHead(
            config.vocab_size,
            config.hidden_size,
            quant_config=quant_config,
            prefix=maybe_prefix(prefix, "lm_head"),
        )
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
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
        return self.model.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters(remove_duplicate=False))
        seen: set[str] = set()
        loader = AutoWeightsLoader(self)
        loaded = loader.load_weights(
            self._known(weights, params, seen), mapper=CHECKPOINT_NAMES
        )
        missing = sorted(
            name
            for param_name, _ in self.named_parameters()
            for name in checkpoint_names(param_name)
            if name not in seen
        )
        if missing:
            raise ValueError(f"The Qwen v1 checkpoint is missing weights: {missing}")
        return loaded

    @staticmethod
    def _known(
        weights: Iterable[tuple[str, torch.Tensor]],
        params: dict[str, nn.Parameter],
        seen: set[str],
    ) -> Iterable[tuple[str, torch.Tensor]]:
        """The checkpoint's tensors, failing on one no parameter takes."""
        for name, tensor in weights:
            target = _KNOWN_NAMES.map_name(name)
            if target is None:
                continue
            if target not in params:
                if name.endswith(".g_idx"):
                    continue  # GPTQ without act-order: vLLM needs no group index
                raise ValueError(
                    f"Unexpected weight {name!r} in the Qwen v1 checkpoint: "
                    "qwen_vllm has no parameter for it. Is this a Qwen v1 "
                    "(QWenLMHeadModel) checkpoint?"
                )
            seen.add(name)
            yield name, tensor
