"""The CPU LoRA ops the plugin installs, against the formula token by token:
row t gets inputs[t] @ W[slot t].T, and a row without an adapter (slot -1)
gets no update, whichever adapters share its batch."""

from __future__ import annotations

import pytest
import torch

from qwen_vllm.model.cpu_lora import bgmv_expand, bgmv_expand_slice, bgmv_shrink

SLOTS, RANK, HIDDEN = 3, 4, 12


def expected_products(inputs, weights, indices):
    rows = [
        torch.zeros(weights.shape[-2], dtype=torch.float64)
        if slot < 0
        else inputs[t].double() @ weights[slot].double().reshape(-1, inputs.shape[1]).T
        for t, slot in enumerate(indices.tolist())
    ]
    return torch.stack(rows)


@pytest.mark.parametrize(
    "slots",
    [[0, 1, 2, 1, 0], [-1, 2, -1, 0, 2], [-1, -1, -1], [1, 1, 1, 1], [2]],
)
def test_shrink_then_expand_per_token(slots):
    generator = torch.Generator().manual_seed(len(slots))
    indices = torch.tensor(slots)
    tokens = len(slots)
    x = torch.randn(tokens, HIDDEN, generator=generator)
    a = torch.randn(SLOTS, 1, RANK, HIDDEN, generator=generator)  # vLLM's stacking
    b = torch.randn(SLOTS, 1, HIDDEN + 2, RANK, generator=generator)

    shrunk = torch.full((tokens, RANK), float("nan"))  # every row is written
    bgmv_shrink(x, a, shrunk, indices, scaling=0.5)
    want = 0.5 * expected_products(x, a, indices)
    torch.testing.assert_close(shrunk.double(), want, rtol=1e-5, atol=1e-5)

    base = torch.randn(tokens, HIDDEN, generator=generator)
    added = base.clone()
    bgmv_expand(shrunk, b, added, indices, add_inputs=True)
    # The adapter's output is 2 wider than the layer's: only the common part.
    update = expected_products(shrunk, b, indices)[:, :HIDDEN]
    torch.testing.assert_close(
        added.double(), base.double() + update, rtol=1e-5, atol=1e-5
    )

    set_to = base.clone()
    bgmv_expand(shrunk, b, set_to, indices, add_inputs=False)
    torch.testing.assert_close(set_to.double(), update, rtol=1e-5, atol=1e-5)

    sliced = base.clone()
    narrow = b[:, :, :5, :]
    bgmv_expand_slice(shrunk, narrow, sliced, indices, 3, 5, add_inputs=True)
    want_sliced = base.double().clone()
    want_sliced[:, 3:8] += expected_products(shrunk, narrow, indices)
    torch.testing.assert_close(sliced.double(), want_sliced, rtol=1e-5, atol=1e-5)


def test_the_plugin_installs_them_where_vllm_looks():
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    from qwen_vllm import plugin

    plugin.register()
    assert punica_cpu.bgmv_shrink is bgmv_shrink
    # The prefill (sgmv) ops reach the bgmv ones through their module.
    assert lora_ops.bgmv_expand is bgmv_expand
    assert lora_ops.bgmv_expand_slice is bgmv_expand_slice
