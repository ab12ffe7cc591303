"""Every Qwen v1 engine on CPU (plain `vllm serve`, `LLM`, QwenChat) gets a
KV cache it can really have, instead of vLLM's 92% of the NUMA node."""

from __future__ import annotations

import pytest


def engine_config(path, **kwargs):
    from vllm.engine.arg_utils import EngineArgs

    from qwen_vllm import plugin

    plugin.register()
    args = EngineArgs(model=str(path), skip_tokenizer_init=True, **kwargs)
    return args.create_engine_config()


def test_the_demo_gets_what_its_batch_can_use(demo_dir):
    config = engine_config(demo_dir, max_num_seqs=64)
    # 2 layers x 2 heads x 32 channels x (K, V) x bf16, 2048 tokens, 64 seqs.
    assert config.cache_config.kv_cache_memory_bytes == 512 * 2048 * 64


def test_an_explicit_size_is_left_alone(demo_dir):
    config = engine_config(demo_dir, kv_cache_memory_bytes=3 << 20)
    assert config.cache_config.kv_cache_memory_bytes == 3 << 20


def test_a_context_the_machine_cannot_hold_is_refused(tmp_path):
    from qwen_vllm.checkpoints.demo import DemoModelSpec, write_demo_model

    # 64 layers x 64 channels x (K, V) x bf16 (vLLM's CPU default for a
    # float32 checkpoint): 16 KiB per token, so one sequence of 8M positions
    # (dynamic NTK allows it) needs 128 GiB.
    deep = DemoModelSpec(
        num_hidden_layers=64,
        seq_length=2048,
        max_position_embeddings=1 << 23,
        use_dynamic_ntk=True,
        dtype="float32",
    )
    path = write_demo_model(tmp_path / "deep", deep)
    # vLLM wraps the plugin's refusal in its config's ValidationError.
    with pytest.raises(
        ValueError, match=r"KV cache for one 8388608-token sequence 128.00 GiB"
    ):
        engine_config(path)
