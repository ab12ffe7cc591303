"""The oracle itself is checked against transformers' Qwen2 implementation."""

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from qwen_vllm.checkpoints.qwen2_layout import qwen2_config_dict, qwen2_state_dict
from qwen_vllm.model.config import QWenConfig
from tests.reference_qwen import ReferenceQwenV1, read_checkpoint


def test_reference_matches_transformers_qwen2(demo_dir):
    config, weights = read_checkpoint(demo_dir)
    reference = ReferenceQwenV1(config, weights)
    hf_config = Qwen2Config(**qwen2_config_dict(QWenConfig.from_pretrained(demo_dir)))
    model = Qwen2ForCausalLM(hf_config).to(torch.float64).eval()
    missing, unexpected = model.load_state_dict(qwen2_state_dict(weights), strict=False)
    assert not unexpected and set(missing) <= {"model.rotary_emb.inv_freq"}
    ids = [151644, 872, 198, 9707, 11, 1879, 0, 151645, 198, 151644, 77091, 198]
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0]
    got = reference.logits(ids)
    assert got.shape == expected.shape
    # transformers builds its rotary tables in float32: agreement to ~1e-6.
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)
    # Sanity: the comparison can fail. A different prompt gives other logits.
    assert not torch.allclose(reference.logits(ids[::-1]), expected, atol=1e-3)
