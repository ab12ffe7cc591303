"""A Qwen v1 config's sizes, and the tensor-parallel sizes its weights split into.

Pure Python (no transformers, torch or vLLM): the launch tooling checks a plan
with it in a second, and the plugin's config hook checks every engine with it.

GPTQ (-Int4/-Int8) weights are stored in groups of `group_size` input
channels, each group with its own scales and zero points. vLLM 0.32 loads a
checkpoint's "gptq" config as `auto_gptq`, which gives each rank of a
row-parallel layer (the inputs split across ranks) the scale rows of
`inputs_per_rank // group_size` whole groups: a group straddling two ranks
cannot be served. vLLM finds out late (loading weights in every rank), or
not at all: its CPU kernel does not check. The rule here is the one vLLM's
kernels state, plus the output splits of its parallel layers and the
zero-point packing; see `GptqSplit.problem`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from qwen_vllm.model.refusal import ConfigRefused

# Field names of the first Qwen-7B-Chat release, which followed GPT-2.
GPT2_STYLE_NAMES = {
    "n_embd": "hidden_size",
    "n_layer": "num_hidden_layers",
    "n_head": "num_attention_heads",
    "ffn_hidden_size": "intermediate_size",
    "n_positions": "max_position_embeddings",
    "padded_vocab_size": "vocab_size",
}

# Qwen-7B's values, the defaults of the published config class.
DEFAULTS: dict[str, Any] = {
    "vocab_size": 151936,
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "kv_channels": 128,
    "intermediate_size": 22016,
    "layer_norm_epsilon": 1e-6,
    "rotary_pct": 1.0,
    "rotary_emb_base": 10000.0,
    "seq_length": 8192,
    "max_position_embeddings": 8192,
    "use_dynamic_ntk": True,
    "use_logn_attn": True,
    "initializer_range": 0.02,
}

# The sizes a refusal offers instead: one node's GPUs.
TENSOR_PARALLEL_SIZES = (1, 2, 4, 8)


class TensorParallelMismatch(ConfigRefused):
    """The checkpoint's weights do not split over this many ranks."""


def tensor_parallel_refusal(config: Any, tensor_parallel_size: int) -> str | None:
    """Why a Qwen v1 config (a config.json dict or a QWenConfig) cannot be served
    at this tensor-parallel size, or None. Only GPTQ weights are judged here;
    the attention heads are vLLM's own check (and the launch plan's)."""
    split = GptqSplit.of(config)
    return None if split is None else split.refusal(tensor_parallel_size)


def config_field(config: Any, name: str) -> Any:
    """A field as QWenConfig reads it: GPT-2 style names, then the defaults."""
    if not isinstance(config, Mapping):
        return getattr(config, name)
    if name in config:
        return config[name]
    for old, new in GPT2_STYLE_NAMES.items():
        if new == name and old in config:
            return config[old]
    return DEFAULTS[name]


@dataclass(frozen=True)
class _Linear:
    name: str  # as the message names it
    inputs: int
    outputs: tuple[int, ...]  # the parts of a merged layer
    row_parallel: bool = False  # inputs split across ranks, else outputs


@dataclass(frozen=True)
class GptqSplit:
    """What decides how a GPTQ checkpoint's linear layers split over ranks."""

    attention_heads: int
    hidden_size: int
    mlp_width: int
    bits: int
    group_size: int  # -1: one group per output channel
    desc_act: bool

    @classmethod
    def of(cls, config: Any) -> GptqSplit | None:
        """None unless the config carries a GPTQ quantization_config; ValueError
        naming the field when a size it needs is not a usable integer."""
        if isinstance(config, Mapping):
            quantization = config.get("quantization_config")
        else:
            quantization = getattr(config, "quantization_config", None)
        if hasattr(quantization, "to_dict"):  # a transformers GPTQConfig
            quantization = quantization.to_dict()
        if not isinstance(quantization, Mapping):
            return None
        if str(quantization.get("quant_method", "")).lower() != "gptq":
            return None
        sizes = {
            "num_attention_heads": config_field(config, "num_attention_heads"),
            "hidden_size": config_field(config, "hidden_size"),
            "intermediate_size": config_field(config, "intermediate_size"),
            "bits": quantization.get("bits", 4),
            "group_size": quantization.get("group_size", -1),
        }
        for key, value in sizes.items():
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"GPTQ config: {key} {value!r} is not an integer")
            if value < 1 and not (key == "group_size" and value == -1):
                raise ValueError(f"GPTQ config: {key} {value} is not a size")
        if sizes["bits"] not in (2, 3, 4, 8):
            raise ValueError(f"GPTQ config: bits {sizes['bits']} is not 2, 3, 4 or 8")
        return cls(
            attention_heads=sizes["num_attention_heads"],
            hidden_size=sizes["hidden_size"],
            # Qwen v1 stores twice the MLP width (w1 and w2 each have half).
            mlp_width=sizes["intermediate_size"] // 2,
            bits=sizes["bits"],
            group_size=sizes["group_size"],
            desc_act=bool(quantization.get("desc_act", False)),
        )

    def _layers(self) -> tuple[_Linear, ...]:
        hidden, mlp = self.hidden_size, self.mlp_width
        return (
            _Linear(
                "the attention's QKV projection (attn.c_attn)", hidden, (hidden,) * 3
            ),
            _Linear(
                "the attention's output projection (attn.c_proj)",
                hidden,
                (hidden,),
                True,
            ),
            _Linear(
                "the MLP's gate and up projections (mlp.w2, mlp.w1)", hidden, (mlp, mlp)
            ),
            _Linear("the MLP's output projection (mlp.c_proj)", mlp, (hidden,), True),
        )

    def problem(self, tp: int) -> str | None:
        """What breaks at `tp` ranks, or None (also when tp does not divide the
        heads: vLLM refuses that itself, naming the heads).

        vLLM 0.32's rule (quantization/auto_gptq.py and its kernels):
        - desc_act with groups is refused at any size; with group_size -1 it
          is ignored (utils/gptq_utils.py, normalize_and_validate_gptq_desc_act).
        - each rank's inputs must be whole groups, unless group_size is -1
          (kernels/linear/mixed_precision/marlin.py, can_implement: "A group
          straddling TP ranks cannot be fixed by padding"; auto_gptq.py shards
          the scales as inputs_per_rank // group_size rows).
        - a column-parallel layer's outputs must divide by tp (vLLM's parallel
          linear layers), and each rank's outputs must fill whole 32-bit words
          of zero points (auto_gptq.py: qzeros has outputs // (32 // bits)
          columns).
        """
        group, pack = self.group_size, 32 // self.bits
        if self.desc_act and group != -1:
            return (
                f"this GPTQ checkpoint was quantized with desc_act=True (activation "
                f"order) and group size {group}, which vLLM 0.32 no longer loads "
                "(re-quantize it with desc_act=False)"
            )
        if self.attention_heads % tp:
            return None
        for layer in self._layers():
            per_rank = layer.inputs
            if layer.row_parallel and tp > 1:
                if layer.inputs % tp:
                    return (
                        f"tensor_parallel_size {tp} does not divide the "
                        f"{layer.inputs} inputs of {layer.name}"
                    )
                per_rank = layer.inputs // tp
            if group != -1 and per_rank % group:
                if per_rank == layer.inputs:
                    return (
                        f"the {layer.inputs} inputs of {layer.name} are not a "
                        f"multiple of the GPTQ group size {group}"
                    )
                return (
                    f"tensor_parallel_size {tp} splits the {layer.inputs} inputs "
                    f"of {layer.name} into {per_rank} per rank, not a multiple of "
                    f"the GPTQ group size {group}"
                )
            for outputs in layer.outputs:
                split = 1 if layer.row_parallel else tp
                if outputs % split:
                    return (
                        f"tensor_parallel_size {tp} does not divide the {outputs} "
                        f"outputs of {layer.name}"
                    )
                if (outputs // split) % pack:
                    return (
                        f"tensor_parallel_size {tp} leaves {outputs // split} "
                        f"outputs of {layer.name} per rank, not a multiple of "
                        f"{pack} (GPTQ packs {pack} {self.bits}-bit zero points "
                        "into one 32-bit word)"
                    )
        return None

    def working_sizes(self) -> list[int]:
        """The sizes among TENSOR_PARALLEL_SIZES this checkpoint can use (the
        heads included, so the advice never names a size refused elsewhere)."""
        return [
            n
            for n in TENSOR_PARALLEL_SIZES
            if self.attention_heads % n == 0 and self.problem(n) is None
        ]

    def refusal(self, tp: int) -> str | None:
        problem = self.problem(tp)
        if problem is None:
            return None
        working = self.working_sizes()
        if not working:
            return f"{problem}; no tensor_parallel_size works for this checkpoint"
        sizes = ", ".join(map(str, working))
        return f"{problem}; sizes that work for this checkpoint: {sizes}"
