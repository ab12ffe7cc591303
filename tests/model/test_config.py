import pytest

from qwen_vllm.model.config import QWenConfig


def test_reads_qwen_v1_fields():
    config = QWenConfig(
        hidden_size=256,
        num_attention_heads=2,
        kv_channels=128,
        rotary_pct=0.25,
        rotary_emb_base=20000,
        seq_length=2048,
        max_position_embeddings=8192,
        use_dynamic_ntk=True,
        use_logn_attn=False,
        intermediate_size=1024,
    )
    config.check_servable()
    assert config.head_dim == 128
    assert config.rotary_dim == 32
    assert config.mlp_width == 512
    assert (config.use_dynamic_ntk, config.use_logn_attn) == (True, False)
    assert config.tie_word_embeddings is False


def test_gpt2_style_names_of_the_first_release():
    config = QWenConfig(
        n_embd=512,
        n_layer=3,
        n_head=4,
        kv_channels=128,
        ffn_hidden_size=2048,
        n_positions=6144,
        padded_vocab_size=151936,
    )
    assert config.hidden_size == 512
    assert config.num_hidden_layers == 3
    assert config.num_attention_heads == 4
    assert config.intermediate_size == 2048
    assert config.max_position_embeddings == 6144
    assert config.vocab_size == 151936


def test_rope_theta_of_72b_is_the_rotary_base():
    assert QWenConfig(rope_theta=1_000_000.0).rotary_emb_base == 1_000_000.0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("visual", {"image_size": 448}),
        ("rope_scaling", {"type": "linear", "factor": 2.0}),
        ("no_bias", False),
        ("scale_attn_weights", False),
        ("apply_residual_connection_post_layernorm", True),
        ("num_key_value_heads", 8),
    ],
)
def test_unservable_fields_fail_naming_the_field(field, value):
    with pytest.raises(ValueError, match=repr(field)):
        QWenConfig(**{field: value})


def test_head_size_must_match_hidden_size():
    with pytest.raises(ValueError, match="kv_channels"):
        QWenConfig(hidden_size=4096, num_attention_heads=32, kv_channels=64)


def test_values_a_real_release_carries_are_accepted():
    QWenConfig(
        no_bias=True, scale_attn_weights=True, num_key_value_heads=32
    ).check_servable()


def test_context_length_reaches_max_positions_only_with_dynamic_ntk():
    ntk = QWenConfig(seq_length=2048, max_position_embeddings=8192)
    assert ntk.max_context_length == 8192
    plain = QWenConfig(
        seq_length=2048, max_position_embeddings=8192, use_dynamic_ntk=False
    )
    assert plain.max_context_length == 2048


# (seq_length, max_position_embeddings) of each release, and the context
# Qwen's README states for it ("Max Length").
RELEASES = {
    "Qwen-1.8B": (8192, 8192, 32768),
    "Qwen-7B (v1.1)": (8192, 32768, 32768),
    "Qwen-14B": (2048, 8192, 8192),
    "Qwen-72B": (32768, 32768, 32768),
}


@pytest.mark.parametrize("release", RELEASES)
def test_users_may_ask_for_qwens_stated_context_and_no_more(release):
    seq_length, positions, stated = RELEASES[release]
    config = QWenConfig(seq_length=seq_length, max_position_embeddings=positions)
    assert config.model_max_length == stated
    assert config.max_context_length == positions  # the default is unchanged
    off = QWenConfig(
        seq_length=seq_length, max_position_embeddings=positions, use_dynamic_ntk=False
    )
    assert off.model_max_length == off.max_context_length == seq_length
    assert QWenConfig(model_max_length=4096).model_max_length == 4096


def test_a_qwen_vl_checkpoint_fails_when_loaded(tmp_path):
    import json

    from transformers import AutoConfig

    from qwen_vllm import plugin

    plugin.register()
    config = {"model_type": "qwen", "architectures": ["QWenLMHeadModel"]}
    config["visual"] = {"image_size": 448, "layers": 48}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'visual'"):
        AutoConfig.from_pretrained(tmp_path)
