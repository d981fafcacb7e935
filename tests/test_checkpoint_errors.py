"""Every bad checkpoint is refused with a `CheckpointError` (a ValueError) whose message says what is wrong.

Small checkpoints are written once per module and copied into each test's tmp_path before being corrupted.
"""

import dataclasses
import json
import re
import shutil
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, so safetensors.numpy can read bf16 tensors)
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import gptoss_jax as gj

FORMATS = ("original", "hf")
CFG = dataclasses.replace(gj.ModelConfig.tiny(), vocab_size=512)
# Tensor names per layout used below.
NAMES = {
    "original": {"unembedding": "unembedding.weight", "embedding": "embedding.weight",
                 "sinks0": "block.0.attn.sinks", "sinks1": "block.1.attn.sinks", "qkv0": "block.0.attn.qkv.weight",
                 "blocks1": "block.1.mlp.mlp1_weight.blocks", "scales0": "block.0.mlp.mlp2_weight.scales",
                 "extra": "block.0.attn.extra_bias"},
    "hf": {"unembedding": "lm_head.weight", "embedding": "model.embed_tokens.weight",
           "sinks0": "model.layers.0.self_attn.sinks", "sinks1": "model.layers.1.self_attn.sinks",
           "qkv0": "model.layers.0.self_attn.q_proj.weight",
           "blocks1": "model.layers.1.mlp.experts.gate_up_proj_blocks",
           "scales0": "model.layers.0.mlp.experts.down_proj_scales", "extra": "model.layers.0.self_attn.extra.bias"},
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Pristine checkpoints: {"original", "hf", "hf_sharded"} -> folder."""
    root = tmp_path_factory.mktemp("pristine")
    model = gj.init_model(CFG, dtype=jnp.float32)
    out = {fmt: gj.save_checkpoint(model, root / fmt, fmt, progress=False) for fmt in FORMATS}
    out["hf_sharded"] = gj.save_checkpoint(model, root / "hf_sharded", "hf", max_shard_bytes=100_000,
                                           progress=False)
    return out


@pytest.fixture
def ckpt(saved, tmp_path):
    """A fresh copy of a pristine checkpoint: ckpt("hf") -> folder."""
    def copy(kind: str) -> Path:
        return Path(shutil.copytree(saved[kind], tmp_path / kind))
    return copy


def load_error(path) -> str:
    """The message of the CheckpointError that loading `path` raises."""
    with pytest.raises(gj.CheckpointError) as info:
        gj.load_model(path, dtype=jnp.float32, progress=False)
    assert isinstance(info.value, ValueError)
    return str(info.value)


def edit_tensors(folder: Path, fn, file: str = "model.safetensors") -> None:
    tensors = load_file(folder / file)
    fn(tensors)
    save_file(tensors, str(folder / file), metadata={"format": "pt"})


def edit_config(folder: Path, fn) -> None:
    data = json.loads((folder / "config.json").read_text())
    fn(data)
    (folder / "config.json").write_text(json.dumps(data))


def test_pristine_checkpoints_load(saved):
    # The baseline every corruption below starts from must itself be fine.
    for kind, folder in saved.items():
        layout = gj.find_layout(folder)
        assert layout.format == ("original" if kind == "original" else "hf")
        assert layout.config == CFG
    assert len(list(saved["hf_sharded"].glob("model-*-of-*.safetensors"))) > 2


# ---- tensors -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_missing_tensors_are_all_named(ckpt, fmt):
    folder = ckpt(fmt)
    gone = [NAMES[fmt]["unembedding"], NAMES[fmt]["sinks1"]]
    edit_tensors(folder, lambda t: [t.pop(n) for n in gone])
    msg = load_error(folder)
    assert "2 tensor(s) missing" in msg and f"{fmt} layout" in msg
    for name in gone:
        assert name in msg


@pytest.mark.parametrize("fmt", FORMATS)
def test_unexpected_tensor_is_named(ckpt, fmt):
    folder = ckpt(fmt)
    extra = NAMES[fmt]["extra"]
    edit_tensors(folder, lambda t: t.update({extra: np.zeros(4, ml_dtypes.bfloat16)}))
    msg = load_error(folder)
    assert "unexpected" in msg and extra in msg


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("which, new_shape, want", [
    ("sinks0", (5,), (4,)),
    ("qkv0", (64, 64), None),  # a 2-D tensor with a wrong row count
])
def test_wrong_shape_names_tensor_and_both_shapes(ckpt, fmt, which, new_shape, want):
    folder = ckpt(fmt)
    name = NAMES[fmt][which]
    if want is None:  # the q projection (hf) has N*H = 256 rows; the fused qkv (original) has 512
        want = (CFG.num_attention_heads * CFG.head_dim if fmt == "hf" else CFG.qkv_size, CFG.hidden_size)
    edit_tensors(folder, lambda t: t.update({name: np.zeros(new_shape, ml_dtypes.bfloat16)}))
    msg = load_error(folder)
    assert repr(name) in msg
    assert f"has shape {new_shape}" in msg and f"expected {want}" in msg
    assert "model.safetensors" in msg


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("which, dtype, got, want", [
    ("blocks1", np.int8, "I8", "U8"),  # MXFP4 codes must be uint8
    ("blocks1", np.float32, "F32", "U8"),
    ("scales0", ml_dtypes.bfloat16, "BF16", "U8"),
    ("sinks0", np.int32, "I32", "BF16/F16/F32"),  # a float tensor stored as integers
])
def test_wrong_dtype_names_tensor_and_dtypes(ckpt, fmt, which, dtype, got, want):
    folder = ckpt(fmt)
    name = NAMES[fmt][which]
    edit_tensors(folder, lambda t: t.update({name: t[name].astype(dtype)}))
    msg = load_error(folder)
    assert repr(name) in msg and f"dtype {got}" in msg and want in msg


@pytest.mark.parametrize("fmt", FORMATS)
def test_float32_and_float16_tensors_are_accepted(ckpt, fmt):
    # The converse of the dtype check: any float width is fine for a float tensor.
    folder = ckpt(fmt)
    names = NAMES[fmt]
    edit_tensors(folder, lambda t: t.update({names["sinks0"]: t[names["sinks0"]].astype(np.float32),
                                             names["embedding"]: t[names["embedding"]].astype(np.float16)}))
    model = gj.load_model(folder, dtype=jnp.float32, progress=False)
    assert model.embedding[...].shape == (CFG.vocab_size, CFG.hidden_size)


# ---- files -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("cut", ["half", "last byte"])
def test_truncated_file_is_named(ckpt, fmt, cut):
    folder = ckpt(fmt)
    f = folder / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if cut == "half" else data[:-1])
    msg = load_error(folder)
    assert str(f) in msg and "truncated or corrupt" in msg


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("garbage", [b"\xff" * 64, b"not a safetensors file at all"])
def test_corrupt_header_is_named(ckpt, fmt, garbage):
    folder = ckpt(fmt)
    f = folder / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(garbage + data[len(garbage):] if len(garbage) > 32 else garbage)
    msg = load_error(folder)
    assert str(f) in msg and "corrupt" in msg and "not a readable safetensors file" in msg


def test_corrupt_shard_of_sharded_checkpoint_is_named(ckpt):
    folder = ckpt("hf_sharded")
    shard = sorted(folder.glob("model-*-of-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:100])
    msg = load_error(folder)
    assert shard.name in msg and "truncated or corrupt" in msg


# ---- config.json vs tensors --------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_config_hidden_size_disagreeing_with_tensors(ckpt, fmt):
    folder = ckpt(fmt)
    edit_config(folder, lambda c: c.update(hidden_size=96))
    msg = load_error(folder)
    assert repr(NAMES[fmt]["embedding"]) in msg
    assert "has shape (512, 64)" in msg and "expected (512, 96)" in msg and "hidden_size=96" in msg
    assert str(folder / "config.json") in msg and "disagrees" in msg


@pytest.mark.parametrize("fmt", FORMATS)
def test_config_vocab_size_disagreeing_with_tensors(ckpt, fmt):
    folder = ckpt(fmt)
    edit_config(folder, lambda c: c.update(vocab_size=1024))
    msg = load_error(folder)
    assert repr(NAMES[fmt]["embedding"]) in msg
    assert "has shape (512, 64)" in msg and "expected (1024, 64)" in msg and "vocab_size=1024" in msg


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("layers", [1, 3])
def test_config_num_hidden_layers_disagreeing_with_tensors(ckpt, fmt, layers):
    folder = ckpt(fmt)

    def edit(c):
        c["num_hidden_layers"] = layers
        if "layer_types" in c:  # keep the HF config self-consistent so the layer count is what disagrees
            c["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    edit_config(folder, edit)
    msg = load_error(folder)
    assert f"num_hidden_layers={layers}" in msg and "layers 0..1" in msg and "disagrees" in msg
    assert str(folder / "config.json") in msg


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("text, words", [
    ('{"num_experts": 4,', "not valid JSON"),
    ("", "not valid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
])
def test_invalid_config_json(ckpt, fmt, text, words):
    folder = ckpt(fmt)
    (folder / "config.json").write_text(text)
    msg = load_error(folder)
    assert str(folder / "config.json") in msg and words in msg


def test_unknown_key_in_original_config(ckpt):
    folder = ckpt("original")
    edit_config(folder, lambda c: c.update(rope_type="yarn"))
    msg = load_error(folder)
    assert "unknown field(s) ['rope_type']" in msg and str(folder / "config.json") in msg


def test_missing_key_in_original_config(ckpt):
    folder = ckpt("original")
    edit_config(folder, lambda c: c.pop("rope_theta"))
    msg = load_error(folder)
    assert "missing field(s) ['rope_theta']" in msg


def test_original_config_of_unknown_kind(ckpt):
    folder = ckpt("original")
    (folder / "config.json").write_text(json.dumps({"hidden_size": 64}))
    msg = load_error(folder)
    assert "neither an original gpt-oss config" in msg and "model_type" in msg


def test_hf_config_of_another_model_type(ckpt):
    folder = ckpt("hf")
    edit_config(folder, lambda c: c.update(model_type="llama"))
    msg = load_error(folder)
    assert "model_type is 'llama'" in msg and "gpt_oss" in msg


def test_original_config_field_of_wrong_type(ckpt):
    folder = ckpt("original")
    edit_config(folder, lambda c: c.update(num_experts="4"))
    msg = load_error(folder)
    assert "num_experts" in msg and "integer" in msg and "'4'" in msg


# ---- folders -----------------------------------------------------------------------------------------------------
def test_nonexistent_path(tmp_path):
    msg = load_error(tmp_path / "nope")
    assert str(tmp_path / "nope") in msg and "does not exist" in msg


def test_file_instead_of_folder(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    msg = load_error(f)
    assert "not a folder" in msg


def test_empty_folder(tmp_path):
    msg = load_error(tmp_path)
    assert str(tmp_path) in msg and "neither checkpoint layout" in msg


def test_folder_of_random_files(tmp_path):
    (tmp_path / "README.md").write_text("# hello\n")
    (tmp_path / "weights.bin").write_bytes(bytes(range(256)))
    (tmp_path / "sub").mkdir()
    msg = load_error(tmp_path)
    assert "neither checkpoint layout" in msg and "config.json" in msg and ".safetensors" in msg


@pytest.mark.parametrize("fmt", FORMATS)
def test_config_without_weights(ckpt, fmt):
    folder = ckpt(fmt)
    (folder / "model.safetensors").unlink()
    msg = load_error(folder)
    assert "config.json but no *.safetensors" in msg


def test_weights_without_config(ckpt):
    folder = ckpt("hf")
    (folder / "config.json").unlink()
    msg = load_error(folder)
    assert "neither checkpoint layout" in msg


# ---- sharded HF checkpoints --------------------------------------------------------------------------------------
def test_index_naming_a_missing_shard(ckpt):
    folder = ckpt("hf_sharded")
    shard = sorted(folder.glob("model-*-of-*.safetensors"))[-1]
    shard.unlink()
    msg = load_error(folder)
    assert "model.safetensors.index.json" in msg and f"names shard {shard.name}" in msg and "missing" in msg


def test_index_mapping_a_tensor_to_the_wrong_shard(ckpt):
    folder = ckpt("hf_sharded")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    wrong = next(s for s in reversed(shards) if s != index["weight_map"]["lm_head.weight"])
    index["weight_map"]["lm_head.weight"] = wrong
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    msg = load_error(folder)
    assert "'lm_head.weight'" in msg and wrong in msg and "does not hold" in msg


def test_index_dropping_a_tensor(ckpt):
    # A tensor that is in a shard but not in the index is not found: the index is the source of truth.
    folder = ckpt("hf_sharded")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.norm.weight"]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    msg = load_error(folder)
    assert "missing" in msg and "model.norm.weight" in msg


@pytest.mark.parametrize("text, words", [
    ("{not json", "not valid JSON"),
    (json.dumps({"metadata": {}}), "weight_map"),
    (json.dumps({"weight_map": {"lm_head.weight": 3}}), "weight_map"),
])
def test_invalid_index(ckpt, text, words):
    folder = ckpt("hf_sharded")
    (folder / "model.safetensors.index.json").write_text(text)
    msg = load_error(folder)
    assert "model.safetensors.index.json" in msg and words in msg


def test_same_tensor_in_two_unindexed_files(ckpt):
    folder = ckpt("hf")
    tensors = load_file(folder / "model.safetensors")
    save_file({"lm_head.weight": tensors["lm_head.weight"]}, str(folder / "extra.safetensors"))
    msg = load_error(folder)
    assert "'lm_head.weight'" in msg and "extra.safetensors" in msg and "model.safetensors" in msg


# ---- ModelConfig validation --------------------------------------------------------------------------------------
@pytest.mark.parametrize("fields, words", [
    ({"num_attention_heads": 4, "num_key_value_heads": 3}, ["num_attention_heads (4)", "divisible",
                                                            "num_key_value_heads (3)"]),
    ({"hidden_size": 48}, ["hidden_size (48)", "multiple of 32"]),
    ({"intermediate_size": 40}, ["intermediate_size (40)", "multiple of 32"]),
    ({"experts_per_token": 5}, ["experts_per_token (5)", "exceeds", "num_experts (4)"]),
])
def test_model_config_validation(fields, words):
    with pytest.raises(gj.ConfigError) as info:
        dataclasses.replace(CFG, **fields)
    assert isinstance(info.value, ValueError)
    for w in words:
        assert w in str(info.value)


def test_hf_config_with_truncating_rope_is_refused(ckpt):
    hf = CFG.to_hf_json()
    hf["rope_scaling"]["truncate"] = True
    with pytest.raises(gj.ConfigError, match="truncate=true"):
        gj.ModelConfig.from_json_dict(hf)
    folder = ckpt("hf")  # the same config inside a checkpoint is a CheckpointError naming the file
    edit_config(folder, lambda c: c["rope_scaling"].update(truncate=True))
    msg = load_error(folder)
    assert "truncate=true" in msg and str(folder / "config.json") in msg


@pytest.mark.parametrize("layer_types", [
    ["full_attention", "sliding_attention"],
    ["sliding_attention", "sliding_attention"],
    ["sliding_attention"],
])
def test_hf_config_with_non_alternating_layer_types_is_refused(ckpt, layer_types):
    hf = CFG.to_hf_json()
    hf["layer_types"] = layer_types
    with pytest.raises(gj.ConfigError) as info:
        gj.ModelConfig.from_json_dict(hf)
    assert "layer_types" in str(info.value) and re.search(r"sliding window on even layers", str(info.value))
    folder = ckpt("hf")
    edit_config(folder, lambda c: c.update(layer_types=layer_types))
    assert "layer_types" in load_error(folder)


def test_hf_config_with_other_rope_type_is_refused():
    hf = CFG.to_hf_json()
    hf["rope_scaling"]["rope_type"] = "linear"
    with pytest.raises(gj.ConfigError, match="'linear'"):
        gj.ModelConfig.from_json_dict(hf)
