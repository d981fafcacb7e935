"""The training step: gradients against finite differences, packed loss == separate losses, accumulation,
the optimizer's float32 state and weight-decay mask."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gptoss_jax as gj
from gptoss_jax.train.data import Example, pack
from gptoss_jax.train.step import (decay_mask, init_opt_state, make_optimizer, make_train_step, token_losses)

# The tiny architecture with a small vocabulary (token ids here are arbitrary, not Harmony). Batches hold >= 40
# tokens: the expert matmul then takes its prefill/training form (up to 64 routed rows take the decode form, whose
# gradient takes XLA:CPU ~5x longer to compile).
CFG = dataclasses.replace(gj.ModelConfig.tiny(), vocab_size=512, sliding_window=8)


@pytest.fixture(scope="module")
def model():
    return gj.init_model(CFG, seed=1, dtype=jnp.float32, experts="dense")


def _rows(lengths, seq_len, seed=0):
    rng = np.random.default_rng(seed)
    exs = [Example(rng.integers(0, CFG.vocab_size, n).astype(np.int32), rng.random(n) < 0.7) for n in lengths]
    return exs, pack(exs, seq_len)


def _batch(rows):
    return {k: jnp.asarray(getattr(rows, k)) for k in ("inputs", "targets", "weights", "segment_ids", "positions")}


@nnx.jit(static_argnames="chunk")
def _losses(model, batch, chunk=1024):
    return token_losses(model, batch, chunk=chunk)


ROW = 40  # one row shape for the loss tests: one compilation


def test_packed_loss_equals_separate_losses(model):
    exs, rows = _rows([13, 9, 11], ROW)
    assert len(rows) == 1  # all three share one row
    total, count = _losses(model, _batch(rows), chunk=7)  # chunking with padding at the end
    separate = [_losses(model, _batch(pack([ex], ROW)), chunk=7) for ex in exs]
    np.testing.assert_allclose(float(total), sum(float(s) for s, _ in separate), rtol=2e-6)
    assert float(count) == sum(float(n) for _, n in separate) == sum(ex.loss_mask[1:].sum() for ex in exs)


def test_chunking_per_row_changes_nothing_and_never_stacks_the_unembedding(model):
    """Several rows, chunks of a few tokens of each row (trained tokens first, empty chunks skipped, padding at the
    end) against one chunk holding everything; and in the gradient no [chunks, vocab, hidden] array: the
    checkpointed chunk must not save the unembedding once per chunk (it did: 9 GiB on a 120b train step)."""
    _, rows = _rows([13, 9, 11, 30, 25, 7, 36], ROW)
    assert len(rows) >= 3
    b = _batch(rows)
    whole, n_whole = _losses(model, b, chunk=len(rows) * ROW)
    chunked, n = _losses(model, b, chunk=7 * len(rows))  # 7 tokens of each row a chunk
    np.testing.assert_allclose(float(chunked), float(whole), rtol=2e-6)
    assert float(n) == float(n_whole)
    graphdef, params = nnx.split(model)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: token_losses(nnx.merge(graphdef, p), b, chunk=7)[0]))(params))
    assert f"[{CFG.vocab_size},{CFG.hidden_size}]" in jaxpr  # the unembedding's own shape is there ...
    stacked = {int(n) for n in re.findall(rf"\[(\d+),{CFG.vocab_size},{CFG.hidden_size}\]", jaxpr)}
    assert stacked <= {1, CFG.num_hidden_layers}  # ... never one per chunk (the fused qkv stack has this shape)


def test_loss_ignores_prompt_tokens(model):
    """Changing a target whose weight is 0 leaves the loss alone; changing a trained one does not."""
    _, rows = _rows([20], ROW)
    b = _batch(rows)
    base = float(_losses(model, b, chunk=7)[0])
    w = np.asarray(rows.weights[0])
    off, on = int(np.flatnonzero(w == 0)[0]), int(np.flatnonzero(w == 1)[0])
    for i, changes in ((off, False), (on, True)):
        t = np.array(rows.targets)
        t[0, i] = (t[0, i] + 1) % CFG.vocab_size
        got = float(_losses(model, {**b, "targets": jnp.asarray(t)}, chunk=7)[0])
        assert (got != base) == changes


def _mean_loss(graphdef, params, batch, remat="none"):
    s, n = token_losses(nnx.merge(graphdef, params), batch, remat)
    return s / n


# One parameter of each kind, sinks, router and experts included.
PROBES = [("blocks", "attn", "sinks"), ("blocks", "attn", "qkv_w"), ("blocks", "attn", "out_b"),
          ("blocks", "attn", "norm", "scale"), ("blocks", "mlp", "gate_w"), ("blocks", "mlp", "gate_b"),
          ("blocks", "mlp", "mlp1", "weight"), ("blocks", "mlp", "mlp2", "weight"), ("blocks", "mlp", "mlp1_b"),
          ("embedding",), ("unembedding",), ("norm", "scale")]


@pytest.fixture(scope="module")
def grad_case(model):
    """A packed batch and its gradient function (per remat policy) and no-remat gradients."""
    _, rows = _rows([17, 12], ROW, seed=3)
    batch = _batch(rows)
    graphdef, params = nnx.split(model)

    def grad_fn(remat):
        return jax.jit(jax.grad(lambda p: _mean_loss(graphdef, p, batch, remat)))

    return batch, grad_fn, grad_fn("none")(params)


def test_gradients_match_finite_differences(model, grad_case):
    """float32 central differences of the mean loss along a direction in each parameter (random weights on its
    eight entries of largest gradient) against the gradient's projection on it. The step is small enough that no
    token changes its experts."""
    batch, _, grads = grad_case
    graphdef, params = nnx.split(model)
    loss = jax.jit(lambda p: _mean_loss(graphdef, p, batch))
    grads = dict(nnx.to_flat_state(grads))
    rng = np.random.default_rng(0)
    eps = 3e-4
    for path in PROBES:
        leaf = dict(nnx.to_flat_state(params))[path]
        value, g = leaf.get_value(), np.asarray(grads[path].get_value())
        d = np.zeros(g.size, np.float32)
        d[np.argsort(-np.abs(g).ravel())[:8]] = rng.standard_normal(8)
        d = d.reshape(g.shape)

        def at(sign):
            leaf.set_value(value + sign * eps * d)
            return float(loss(params))

        fd = (at(1) - at(-1)) / (2 * eps)
        leaf.set_value(value)
        projected = float(np.vdot(g, d))
        assert abs(projected) > 1e-3, ".".join(path)
        np.testing.assert_allclose(projected, fd, rtol=2e-2, atol=2e-3, err_msg=".".join(path))


def test_accumulation_equals_one_big_batch(model):
    """Two micro-batches of one row step exactly like one batch of two rows."""
    _, rows = _rows([30, 35, 12, 14], ROW, seed=5)
    rows = rows[:2]
    graphdef, params = nnx.split(model)
    # Adam's first update is ~lr * g / (|g| + eps): for gradients near eps, rounding-level differences move a
    # weight by a fraction of lr, so the weights are compared to 0.1 lr.
    tx, schedule = make_optimizer(lr=1e-4, warmup=0, steps=10, weight_decay=0.1, clip_norm=1.0,
                                  mask=decay_mask(params))
    step = make_train_step(graphdef, tx, schedule, donate=False)
    opt = init_opt_state(tx, params)
    b = _batch(rows)
    one = step(params, opt, 0, jax.tree.map(lambda x: x[None], b))
    two = step(params, opt, 0, jax.tree.map(lambda x: x[:, None], b))
    np.testing.assert_allclose(float(one[2]["loss"]), float(two[2]["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(one[2]["grad_norm"]), float(two[2]["grad_norm"]), rtol=1e-5)
    for a, c in zip(jax.tree.leaves(one[0]), jax.tree.leaves(two[0])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-5, atol=1e-5)
    changed = [not np.array_equal(np.asarray(a), np.asarray(p)) for a, p in zip(jax.tree.leaves(one[0]),
                                                                                jax.tree.leaves(params))]
    assert all(changed), "every parameter (sinks, router, experts, ...) is trained"


def test_bf16_params_with_float32_moments():
    m = gj.init_model(CFG, seed=0, dtype=jnp.bfloat16, experts="dense")
    graphdef, params = nnx.split(m)
    tx, _ = make_optimizer(lr=1e-3, warmup=0, steps=10, weight_decay=0.0, clip_norm=1.0, mask=decay_mask(params))
    state = init_opt_state(tx, params)
    floats = [x for x in jax.tree.leaves(state) if hasattr(x, "dtype") and x.ndim > 0]
    assert floats and all(x.dtype == jnp.float32 for x in floats)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    moment_bytes = sum(x.size * x.dtype.itemsize for x in floats)
    assert moment_bytes == 8 * n_params  # two float32 moments per parameter


def test_decay_mask_spares_norms_biases_and_sinks(model):
    _, params = nnx.split(model)
    mask = dict(nnx.to_flat_state(decay_mask(params)))
    decayed = sorted(".".join(p) for p, v in mask.items() if v.get_value())
    assert decayed == ["blocks.attn.out_w", "blocks.attn.qkv_w", "blocks.mlp.gate_w", "blocks.mlp.mlp1.weight",
                       "blocks.mlp.mlp2.weight", "embedding", "unembedding"]


def test_remat_gives_the_same_gradients(model, grad_case):
    batch, grad_fn, base = grad_case
    _, params = nnx.split(model)
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(grad_fn("full")(params))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5 * float(jnp.abs(a).max()))
    with pytest.raises(ValueError, match="remat must be one of"):
        model.hidden(batch["inputs"], remat="sometimes")
