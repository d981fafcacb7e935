import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gptoss_jax as gj
from gptoss_jax import ops
from gptoss_jax.model import DenseExperts

CFG = dataclasses.replace(gj.ModelConfig.tiny(), vocab_size=512, num_hidden_layers=3)


@pytest.fixture(scope="module")
def model():
    return gj.init_model(CFG, seed=1, dtype=jnp.float32)


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 200))


def test_forward_shape_dtype_and_finite(model, tokens):
    logits = model(tokens)
    assert logits.shape == (2, 200, CFG.vocab_size) and logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()


def test_random_init_exercises_every_parameter_kind(model):
    for path, v in nnx.to_flat_state(nnx.state(model)):
        x = np.asarray(v.get_value(), np.float32)
        assert np.count_nonzero(x) > 0.9 * x.size, path  # router, sinks and biases are not zero


def test_causal(model, tokens):
    changed = tokens.copy()
    changed[:, 150:] = (changed[:, 150:] + 1) % CFG.vocab_size
    a, b = np.asarray(model(tokens)), np.asarray(model(changed))
    np.testing.assert_array_equal(a[:, :150], b[:, :150])
    assert np.abs(a[:, 150:] - b[:, 150:]).max() > 1e-3


def test_batch_rows_are_independent(model, tokens):
    np.testing.assert_allclose(np.asarray(model(tokens[1:])), np.asarray(model(tokens))[1:], atol=1e-5)


def test_inside_a_user_jit_equals_the_eager_call(model, tokens):
    @nnx.jit
    def f(m, t):
        return m(t)
    np.testing.assert_allclose(np.asarray(f(model, jnp.asarray(tokens))), np.asarray(model(tokens)), atol=1e-5)


def test_sliding_window_applies_on_even_layers_only(tokens):
    """Beyond 128 tokens, dropping the window changes the logits; a 1-layer (sliding) model and a window as
    long as the sequence agree."""
    base = gj.init_model(dataclasses.replace(CFG, num_hidden_layers=2), seed=2, dtype=jnp.float32)
    full = gj.init_model(dataclasses.replace(CFG, num_hidden_layers=2, sliding_window=0), seed=2, dtype=jnp.float32)
    wide = gj.init_model(dataclasses.replace(CFG, num_hidden_layers=2, sliding_window=200), seed=2, dtype=jnp.float32)
    a, b, c = (np.asarray(m(tokens)) for m in (base, full, wide))
    np.testing.assert_array_equal(a[:, :128], b[:, :128])
    assert np.abs(a[:, 128:] - b[:, 128:]).max() > 1e-3
    np.testing.assert_allclose(b, c, atol=1e-5)


def test_bfloat16_tracks_float32(tokens):
    f32 = gj.init_model(CFG, seed=1, dtype=jnp.float32)
    b16 = gj.init_model(CFG, seed=1, dtype=jnp.bfloat16)
    assert b16.embedding[...].dtype == jnp.bfloat16 and b16(tokens).dtype == jnp.float32
    agree = (np.asarray(f32(tokens)).argmax(-1) == np.asarray(b16(tokens)).argmax(-1)).mean()
    assert agree > 0.9


def test_dense_and_packed_experts_agree(model, tokens):
    dense = nnx.clone(model)
    for which in ("mlp1", "mlp2"):
        packed = getattr(model.blocks.mlp, which)
        decoded = gj.mxfp4.decode(packed.blocks[...], packed.scales[...], jnp.float32)
        setattr(dense.blocks.mlp, which, DenseExperts(decoded, ("layers", "experts", "out", "in")))
    np.testing.assert_allclose(np.asarray(dense(tokens)), np.asarray(model(tokens)), atol=1e-5)


@pytest.mark.parametrize("bad, words", [
    (np.zeros((3,), np.int32), "2-D"),
    (np.zeros((1, 4), np.float32), "integers"),
    (np.zeros((1, 0), np.int32), "length 0"),
    (np.array([[1, 512]]), r"\[0, 512\)"),
    (np.array([[-1, 2]]), "min -1"),
])
def test_bad_tokens_get_clear_errors(model, bad, words):
    with pytest.raises(ValueError, match=words):
        model(bad)


def test_layers_run_under_scan(model, tokens):
    """Compile size does not grow with depth: the jaxpr holds one scan over layer pairs."""
    deep = gj.init_model(dataclasses.replace(CFG, num_hidden_layers=8), dtype=jnp.float32)
    jaxprs = [str(jax.make_jaxpr(lambda t, m=m: m.forward(t))(tokens)) for m in (model, deep)]
    assert all("scan" in j for j in jaxprs)
    n_eqns = [len(jax.make_jaxpr(lambda t, m=m: m.forward(t))(tokens).eqns) for m in
              (gj.init_model(dataclasses.replace(CFG, num_hidden_layers=2), dtype=jnp.float32), deep)]
    assert n_eqns[0] == n_eqns[1]


def test_the_kernel_environment_override_is_read_when_the_model_is_built(monkeypatch, tokens):
    """GPTOSS_KERNELS overrides "auto" for a model built under it; a trace never reads it again."""
    cfg = dataclasses.replace(CFG, num_hidden_layers=1)
    monkeypatch.delenv(ops.KERNELS_ENV, raising=False)
    plain = gj.init_model(cfg, dtype=jnp.float32)
    monkeypatch.setenv(ops.KERNELS_ENV, "interpret-tpu")
    kernels = gj.init_model(cfg, dtype=jnp.float32)
    monkeypatch.setenv(ops.KERNELS_ENV, "cuda")  # not a mode: read during a trace, it would raise
    jaxprs = [str(jax.make_jaxpr(lambda t, m=m: m.forward(t))(tokens[:, :16])) for m in (plain, kernels)]
    assert ["pallas_call" in j for j in jaxprs] == [jax.default_backend() in ("tpu", "gpu"), True]
