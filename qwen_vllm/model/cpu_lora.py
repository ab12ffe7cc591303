"""vLLM's batched LoRA ops on its CPU build, grouped by adapter.

vLLM 0.32's CPU build runs LoRA through torch ops (vllm/lora/ops/torch_ops)
that gather, for every token, its adapter's whole A or B matrix, and then
multiply token by token. Two things follow:

- A token that uses no adapter has the LoRA index -1, which indexes the last
  adapter slot. vLLM's GPU kernels skip such tokens; the torch ops give them
  the last slot's update (or an empty slot's stale contents), so a request
  without an adapter that shares a batch with adapter requests comes out
  wrong, while the same request alone is right.
- The gather copies a matrix per token and layer, which is most of the cost
  of turning LoRA on: even a batch of base requests pays it.

`patch()` puts in ops with the same signatures and outputs that multiply each
adapter's rows at once with that adapter's matrix and leave rows of index -1
without an update (zero after a shrink, nothing added by an expand). The sgmv
ops (prefill) call the bgmv ops through their module, so they are covered too.
"""

from __future__ import annotations

import torch


def grouped_products(
    inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, dtype
) -> torch.Tensor:
    """Row t of the result is inputs[t] @ weights[indices[t]].T, or zeros
    where indices[t] < 0; weights are stacked per slot, (slots, [1,] out, in)."""
    if weights.dim() == 4:
        weights = weights.squeeze(dim=1)
    inputs = inputs.to(dtype=dtype)
    result = inputs.new_zeros((inputs.shape[0], weights.shape[1]))
    for slot in torch.unique(indices).tolist():
        if slot < 0:
            continue
        matrix = weights[slot].to(dtype=dtype)
        chosen = indices == slot
        if bool(chosen.all()):
            return inputs @ matrix.T
        rows = chosen.nonzero(as_tuple=True)[0]
        result[rows] = inputs[rows] @ matrix.T
    return result


def bgmv_shrink(
    inputs: torch.Tensor,
    lora_a_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    scaling: float = 1.0,
) -> None:
    outputs = grouped_products(
        inputs, lora_a_weights, lora_indices_tensor, output_tensor.dtype
    )
    output_tensor[:, : outputs.shape[1]] = scaling * outputs


def bgmv_expand(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    add_inputs: bool = True,
) -> None:
    outputs = grouped_products(
        inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype
    )
    # As vLLM's op: one output row broadcasts, and adapter and model may pad
    # their outputs differently.
    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
        limit = 1
    common = min(outputs.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :common] += outputs[:limit, :common]
    else:
        output_tensor[:, :common] = outputs[:limit, :common]


def bgmv_expand_slice(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = True,
) -> None:
    outputs = grouped_products(
        inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype
    )
    if add_inputs:
        output_tensor[:, slice_offset : slice_offset + slice_size] += outputs
    else:
        output_tensor[:, slice_offset : slice_offset + slice_size] = outputs


_OPS = {
    "bgmv_shrink": bgmv_shrink,
    "bgmv_expand": bgmv_expand,
    "bgmv_expand_slice": bgmv_expand_slice,
}


def patch() -> None:
    """Install the ops where vLLM's CPU LoRA path looks them up."""
    from vllm.lora.ops import torch_ops
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    for name, op in _OPS.items():
        for module in (lora_ops, torch_ops, punica_cpu):
            setattr(module, name, op)
