"""Base requests in a batch with LoRA adapters, on vLLM's CPU build.

vLLM marks a token that uses no adapter with the LoRA index -1. Its GPU
kernels skip such tokens; the torch ops its CPU build runs instead
(vllm/lora/ops/torch_ops, vLLM 0.32) index the stacked adapter weights with
it, and -1 selects the last adapter slot. A request without an adapter that
shares a batch with adapter requests then gets the last slot's update (or the
stale contents of an empty slot) added to every LoRA-wrapped layer: its
tokens come out wrong, while the same request alone is right.

`patch()` wraps the three batched ops so that the input rows of tokens with
index -1 are zero: the shrink then writes zeros for them and the expand adds
nothing, which is what "no adapter" means. The sgmv ops (prefill) call the
bgmv ops through their module, so they are covered too.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

_OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")


def without_adapter_rows(op: Callable[..., Any]) -> Callable[..., Any]:
    """`op(inputs, weights, output, indices, ...)` with rows of index -1 zeroed."""

    @functools.wraps(op)
    def run(
        inputs: torch.Tensor,
        weights: torch.Tensor,
        output: torch.Tensor,
        indices: torch.Tensor,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        no_adapter = indices < 0
        if bool(no_adapter.any()):
            inputs = inputs.masked_fill(no_adapter[:, None], 0)
        return op(inputs, weights, output, indices, *args, **kwargs)

    run._qwen_vllm = True  # type: ignore[attr-defined]
    return run


def patch() -> None:
    """Install the wrapper where vLLM's CPU LoRA path looks the ops up."""
    from vllm.lora.ops import torch_ops
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    for name in _OPS:
        original = getattr(lora_ops, name)
        if getattr(original, "_qwen_vllm", False):
            continue
        wrapped = without_adapter_rows(original)
        for module in (lora_ops, torch_ops, punica_cpu):
            setattr(module, name, wrapped)
