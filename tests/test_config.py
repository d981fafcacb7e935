import dataclasses

import pytest
from flax import nnx

import gptoss_jax as gj
from gptoss_jax.config import ORIGINAL_CONFIG_KEYS


@pytest.mark.parametrize("preset, params, nbytes, limit_gib", [
    (gj.ModelConfig.gpt_oss_20b, 20_914_757_184, 13_761_264_768, 13.0),
    (gj.ModelConfig.gpt_oss_120b, 116_829_156_672, 65_248_815_744, 61.5),
])
def test_full_size_parameter_count_and_bytes_without_allocating(preset, params, nbytes, limit_gib):
    model = nnx.eval_shape(lambda: gj.init_model(preset()))
    assert gj.param_count(model) == params  # docs/spec.md's totals
    assert gj.param_bytes(model) == nbytes  # exactly the official checkpoint's bytes: experts stay MXFP4
    assert gj.param_bytes(model) <= limit_gib * 2**30


def test_presets_match_spec():
    c20, c120 = gj.ModelConfig.gpt_oss_20b(), gj.ModelConfig.gpt_oss_120b()
    assert (c20.num_hidden_layers, c20.num_experts, c120.num_hidden_layers, c120.num_experts) == (24, 32, 36, 128)
    for c in (c20, c120):
        assert (c.experts_per_token, c.vocab_size, c.hidden_size, c.intermediate_size) == (4, 201088, 2880, 2880)
        assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.sliding_window) == (64, 8, 64, 128)
        assert (c.rope_theta, c.initial_context_length, c.rope_scaling_factor) == (150000.0, 4096, 32.0)
        assert (c.rope_ntk_beta, c.rope_ntk_alpha, c.swiglu_alpha, c.swiglu_limit) == (32.0, 1.0, 1.702, 7.0)
        assert c.max_position_embeddings == 131072
        assert [c.layer_window(i) for i in range(4)] == [128, 0, 128, 0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        c20.hidden_size = 1


@pytest.mark.parametrize("cfg", [gj.ModelConfig.gpt_oss_20b(), gj.ModelConfig.tiny()])
def test_config_json_round_trips_in_both_layouts(cfg):
    original = cfg.to_original_json()
    assert tuple(original) == ORIGINAL_CONFIG_KEYS
    assert gj.ModelConfig.from_json_dict(original) == cfg
    hf = cfg.to_hf_json()
    assert hf["model_type"] == "gpt_oss" and hf["rope_scaling"]["truncate"] is False
    assert gj.ModelConfig.from_json_dict(hf) == cfg


def test_hf_config_accepts_rope_parameters_spelling():
    hf = gj.ModelConfig.tiny().to_hf_json()
    hf["rope_parameters"] = hf.pop("rope_scaling") | {"rope_theta": hf.pop("rope_theta")}
    assert gj.ModelConfig.from_json_dict(hf) == gj.ModelConfig.tiny()


@pytest.mark.parametrize("field, value, words", [
    ("num_key_value_heads", 3, "divisible"),
    ("hidden_size", 48, "multiple of 32"),
    ("intermediate_size", 100, "multiple of 32"),
    ("experts_per_token", 9, "exceeds"),
    ("num_hidden_layers", 0, "positive"),
    ("sliding_window", -1, "sliding_window"),
    ("head_dim", 63, "even"),
])
def test_invalid_fields_are_named(field, value, words):
    with pytest.raises(gj.ConfigError, match=words):
        dataclasses.replace(gj.ModelConfig.tiny(), **{field: value})


def test_preset_lookup():
    assert gj.ModelConfig.preset("20b") == gj.ModelConfig.gpt_oss_20b()
    with pytest.raises(gj.ConfigError, match="unknown preset"):
        gj.ModelConfig.preset("7b")
