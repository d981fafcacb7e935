"""Saving and loading are exact: load -> save -> load reproduces logits bit for bit in every layout, sharded or not,
conversions are byte-identical, and a failed save leaves nothing behind."""

import dataclasses
import json
import re
import shutil
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, so safetensors.numpy can read bf16 tensors)
import numpy as np
import pytest
from safetensors.numpy import load_file

import gptoss_jax as gj
import gptoss_jax.checkpoint.save as ckpt_mod
from gptoss_jax import mxfp4
from gptoss_jax.checkpoint import INDEX_FILE, convert_checkpoint

CFG = dataclasses.replace(gj.ModelConfig.tiny(), vocab_size=512)
# (format, experts) of a save
TARGETS = {"original": ("original", "mxfp4"), "hf": ("hf", "mxfp4"), "hf-bf16": ("hf", "bf16")}


def save(model, path, target="original", **kw):
    fmt, experts = TARGETS[target]
    return gj.save_checkpoint(model, path, fmt, experts=experts, progress=False, **kw)


def load(path, **kw):
    return gj.load_model(path, dtype=jnp.float32, progress=False, **kw)


def tensors(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assert_same_tensors(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), name


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("roundtrip")


@pytest.fixture(scope="module")
def saved(root):
    """A random float32 model saved once per target: {"original", "hf", "hf-bf16"} -> folder."""
    model = gj.init_model(CFG, dtype=jnp.float32)
    return {t: save(model, root / t, t) for t in TARGETS}


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 200), dtype=np.int32)


@pytest.fixture(scope="module")
def reference_logits(saved, tokens):
    logits = np.asarray(load(saved["original"])(tokens))
    assert logits.shape == (2, 200, CFG.vocab_size) and logits.dtype == np.float32
    assert np.isfinite(logits).all() and logits.std() > 0.1  # a real forward pass, not a constant
    return logits


def test_all_layouts_of_one_model_give_the_same_logits(saved, tokens, reference_logits):
    for target, folder in saved.items():
        np.testing.assert_array_equal(np.asarray(load(folder)(tokens)), reference_logits, err_msg=target)


@pytest.mark.parametrize("src", ["original", "hf", "hf-bf16"])
@pytest.mark.parametrize("dest", list(TARGETS))
def test_load_save_load_is_bit_identical(saved, root, tokens, reference_logits, src, dest):
    model = load(saved[src])
    out = save(model, root / f"rt-{src}-to-{dest}", dest)
    layout = gj.find_layout(out)
    assert (layout.format, layout.experts) == (TARGETS[dest][0], "dense" if dest == "hf-bf16" else "mxfp4")
    assert layout.config == CFG
    again = load(out)
    assert hasattr(again.blocks.mlp.mlp1, "weight" if dest == "hf-bf16" else "blocks")
    np.testing.assert_array_equal(np.asarray(again(tokens)), reference_logits)
    if not (src == "hf-bf16" and dest != "hf-bf16"):  # (re-encoding dense experts may pick other, equal codes)
        assert_same_tensors(tensors(out), tensors(saved[dest]))


def test_bf16_experts_checkpoint_layout(saved):
    t = tensors(saved["hf-bf16"])
    E, D, F = CFG.num_experts, CFG.hidden_size, CFG.intermediate_size
    # HF's dense experts are stored (E, in, out): transposed relative to the packed (out, in)
    assert t["model.layers.0.mlp.experts.gate_up_proj"].shape == (E, D, 2 * F)
    assert t["model.layers.0.mlp.experts.down_proj"].shape == (E, F, D)
    assert t["model.layers.0.mlp.experts.gate_up_proj"].dtype == ml_dtypes.bfloat16
    assert not any(n.endswith(("_blocks", "_scales")) for n in t)
    config = json.loads((saved["hf-bf16"] / "config.json").read_text())
    assert "quantization_config" not in config
    assert json.loads((saved["hf"] / "config.json").read_text())["quantization_config"]["quant_method"] == "mxfp4"
    # The dense weights are the packed ones decoded, transposed.
    packed = tensors(saved["hf"])
    dense = mxfp4.decode_np(packed["model.layers.1.mlp.experts.down_proj_blocks"],
                            packed["model.layers.1.mlp.experts.down_proj_scales"])
    np.testing.assert_array_equal(np.swapaxes(dense, -1, -2),
                                  t["model.layers.1.mlp.experts.down_proj"].astype(np.float32))


@pytest.mark.parametrize("target", ["hf", "hf-bf16", "original"])
def test_sharded_save_writes_an_index_and_loads_identically(saved, root, tokens, reference_logits, target):
    model = load(saved["original"])
    out = save(model, root / f"sharded-{target}", target, max_shard_bytes=100_000)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(shards)
    assert n > 2
    assert shards == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    index = json.loads((out / INDEX_FILE).read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    assert index["metadata"]["total_size"] == sum((out / s).stat().st_size for s in shards)
    for s in shards:  # the index places every tensor where it is
        assert sorted(load_file(out / s)) == sorted(k for k, v in index["weight_map"].items() if v == s)
    unsharded = tensors(saved[target])
    assert_same_tensors(tensors(out), unsharded)
    for s in shards:  # no tensor here exceeds the limit, so no shard's data does (the header adds a little)
        assert (out / s).stat().st_size <= 100_000 + 8_192
    np.testing.assert_array_equal(np.asarray(load(out)(tokens)), reference_logits)


def test_one_shard_has_no_index(saved):
    for folder in saved.values():
        assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]


def test_hf_snapshot_root_with_original_subfolder(saved, tmp_path, tokens, reference_logits):
    snap = tmp_path / "snapshot"
    shutil.copytree(saved["hf"], snap)
    shutil.copytree(saved["original"], snap / "original")
    layout = gj.find_layout(snap)
    assert layout.format == "hf" and layout.folder == snap  # the root's HF layout wins
    np.testing.assert_array_equal(np.asarray(load(snap)(tokens)), reference_logits)
    assert gj.ModelConfig.from_checkpoint(snap) == CFG


def test_root_with_only_original_subfolder(saved, tmp_path, tokens, reference_logits):
    snap = tmp_path / "snapshot"
    shutil.copytree(saved["original"], snap / "original")
    (snap / "README.md").write_text("model card\n")
    layout = gj.find_layout(snap)
    assert layout.format == "original" and layout.folder == snap / "original"
    np.testing.assert_array_equal(np.asarray(load(snap)(tokens)), reference_logits)


@pytest.mark.parametrize("src", ["original", "hf"])
def test_dense_experts_from_mxfp4_match_packed(saved, tokens, reference_logits, src):
    model = load(saved[src], experts="dense")
    w = model.blocks.mlp.mlp1.weight[...]
    assert w.shape == (CFG.num_hidden_layers, CFG.num_experts, 2 * CFG.intermediate_size, CFG.hidden_size)
    assert w.dtype == jnp.float32
    assert not hasattr(model.blocks.mlp.mlp1, "blocks")
    np.testing.assert_allclose(np.asarray(model(tokens)), reference_logits, rtol=1e-5, atol=1e-5)


def _canonical_mxfp4(model):
    """Re-encode the packed experts so their codes are the encoder's own (smallest non-clipping scale).

    Random codes are exactly representable but not always canonical: a block whose largest code is 3.0 decodes
    to the same values as one with half the scale and doubled codes, and encode() picks the latter.
    """
    for which in ("mlp1", "mlp2"):
        ex = getattr(model.blocks.mlp, which)
        p = mxfp4.encode(mxfp4.decode_np(np.asarray(ex.blocks[...]), np.asarray(ex.scales[...])))
        ex.blocks.set_value(jnp.asarray(p.blocks))
        ex.scales.set_value(jnp.asarray(p.scales))
    return model


def test_mxfp4_from_representable_bf16_experts_is_byte_identical(saved, tmp_path, tokens, reference_logits):
    model = _canonical_mxfp4(load(saved["original"]))
    packed = save(model, tmp_path / "packed", "hf")
    dense = save(model, tmp_path / "dense", "hf-bf16")
    encoded = load(dense, experts="mxfp4")
    assert hasattr(encoded.blocks.mlp.mlp1, "blocks") and not hasattr(encoded.blocks.mlp.mlp1, "weight")
    again = save(encoded, tmp_path / "again", "hf")
    assert (again / "model.safetensors").read_bytes() == (packed / "model.safetensors").read_bytes()
    assert (again / "config.json").read_text() == (packed / "config.json").read_text()
    # Canonicalizing changed no value: the logits are the original model's.
    np.testing.assert_array_equal(np.asarray(encoded(tokens)), reference_logits)


def test_mxfp4_from_dense_experts_is_lossless_in_values(saved, tmp_path):
    # Even without canonical codes, bf16 -> mxfp4 reproduces every expert weight exactly.
    encoded = load(saved["hf-bf16"], experts="mxfp4")
    out = save(encoded, tmp_path / "again", "hf")
    a, b = tensors(saved["hf"]), tensors(out)
    for name in a:
        if name.endswith("_blocks"):
            stem = name[: -len("_blocks")]
            np.testing.assert_array_equal(mxfp4.decode_np(a[name], a[stem + "_scales"]),
                                          mxfp4.decode_np(b[name], b[stem + "_scales"]), err_msg=stem)
        elif not name.endswith("_scales"):
            assert a[name].tobytes() == b[name].tobytes(), name


# ---- atomic saving -----------------------------------------------------------------------------------------------
class Boom(RuntimeError):
    pass


def _failing_after_first_shard(monkeypatch):
    real, calls = ckpt_mod.save_file, []

    def fake(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) > 1:
            raise Boom("disk full")
        return real(tensors, filename, metadata=metadata)
    monkeypatch.setattr(ckpt_mod, "save_file", fake)
    return calls


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial" in p.name or ".old" in p.name)


def test_failed_save_leaves_nothing(saved, tmp_path, monkeypatch):
    model = load(saved["original"])
    calls = _failing_after_first_shard(monkeypatch)
    dest = tmp_path / "ckpt"
    with pytest.raises(Boom):
        save(model, dest, "hf", max_shard_bytes=100_000)
    assert len(calls) == 2  # one shard was written before the failure
    assert not dest.exists()
    assert _leftovers(tmp_path) == []
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_checkpoint(saved, tmp_path, monkeypatch):
    dest = Path(shutil.copytree(saved["original"], tmp_path / "ckpt"))
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    model = load(saved["original"])
    _failing_after_first_shard(monkeypatch)
    with pytest.raises(Boom):
        save(model, dest, "hf", max_shard_bytes=100_000, overwrite=True)
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    assert _leftovers(tmp_path) == []


def test_save_refuses_a_non_empty_folder_unless_overwrite(saved, tmp_path, tokens, reference_logits):
    dest = tmp_path / "ckpt"
    dest.mkdir()
    (dest / "notes.txt").write_text("keep me")
    model = load(saved["original"])
    with pytest.raises(FileExistsError, match="overwrite"):
        save(model, dest, "hf")
    assert [p.name for p in dest.iterdir()] == ["notes.txt"]
    out = save(model, dest, "hf", overwrite=True)
    assert out == dest
    assert sorted(p.name for p in dest.iterdir()) == ["config.json", "model.safetensors"]  # replaced, not merged
    assert _leftovers(tmp_path) == []
    np.testing.assert_array_equal(np.asarray(load(dest)(tokens)), reference_logits)


def test_save_into_an_empty_existing_folder(saved, tmp_path):
    dest = tmp_path / "ckpt"
    dest.mkdir()
    save(load(saved["original"]), dest, "original")
    assert gj.find_layout(dest).format == "original"


def test_bad_save_arguments(saved, tmp_path):
    model = load(saved["original"])
    with pytest.raises(ValueError, match="original layout stores experts only as MXFP4"):
        gj.save_checkpoint(model, tmp_path / "x", "original", experts="bf16", progress=False)
    with pytest.raises(ValueError, match="format must be"):
        gj.save_checkpoint(model, tmp_path / "x", "gguf", progress=False)
    assert list(tmp_path.iterdir()) == []


# ---- conversion --------------------------------------------------------------------------------------------------
def test_convert_original_to_hf_to_original_is_byte_identical(saved, tmp_path):
    hf = convert_checkpoint(saved["original"], tmp_path / "hf", "hf", progress=False)
    assert gj.find_layout(hf).format == "hf"
    assert_same_tensors(tensors(hf), tensors(saved["hf"]))  # as if the model had been saved as hf directly
    assert json.loads((hf / "config.json").read_text()) == json.loads((saved["hf"] / "config.json").read_text())
    back = convert_checkpoint(hf, tmp_path / "original", "original", progress=False)
    assert_same_tensors(tensors(back), tensors(saved["original"]))
    assert (back / "config.json").read_text() == (saved["original"] / "config.json").read_text()
    assert sorted(p.name for p in back.iterdir()) == ["config.json", "model.safetensors"]


def test_convert_to_bf16_experts_and_sharded(saved, tmp_path):
    out = convert_checkpoint(saved["original"], tmp_path / "hfb", "hf", experts="bf16", max_shard_bytes=100_000,
                             progress=False)
    assert (out / INDEX_FILE).is_file()
    assert_same_tensors(tensors(out), tensors(saved["hf-bf16"]))
    assert re.fullmatch(r"model-00001-of-\d{5}\.safetensors", sorted(p.name for p in out.glob("*.safetensors"))[0])


def test_convert_refuses_a_non_empty_destination(saved, tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "x").write_text("x")
    with pytest.raises(FileExistsError):
        convert_checkpoint(saved["original"], dest, "hf", progress=False)
    assert [p.name for p in dest.iterdir()] == ["x"]


def test_write_random_checkpoint_streams_a_realistic_model(tmp_path):
    """The layer-by-layer writer (what `gptoss-jax init` uses for any size) gives a loadable model whose layers
    differ and whose weights have init_model's scale."""
    from gptoss_jax.checkpoint import write_random_checkpoint

    cfg = dataclasses.replace(gj.ModelConfig.tiny(), vocab_size=512, num_hidden_layers=3)
    path = write_random_checkpoint(cfg, tmp_path / "r", "hf", seed=2, progress=False)
    model = gj.load_model(path, jnp.float32, progress=False)
    reference = gj.init_model(cfg, seed=2, dtype=jnp.float32)
    for name in ("qkv_w", "sinks", "out_b"):
        ours = np.asarray(getattr(model.blocks.attn, name)[...])
        ref = np.asarray(getattr(reference.blocks.attn, name)[...])
        assert not np.array_equal(ours[0], ours[1])
        assert 0.8 < ours.std() / ref.std() < 1.25
    scales = [np.asarray(m.blocks.mlp.mlp1.scales[...], np.float64).mean() for m in (model, reference)]
    assert abs(scales[0] - scales[1]) < 0.1  # the same expert weight scale
    assert np.isfinite(np.asarray(model(np.array([[1, 2, 3]])))).all()
