"""Compact-vocabulary training (gptoss_jax.train.vocab): the same losses and per-row gradients as the full
vocabulary when the unseen tokens' unembedding rows are tied, and an export that restores the full model."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gptoss_jax as gj
from gptoss_jax.train.config import RunError
from gptoss_jax.train.step import token_losses
from gptoss_jax.train.vocab import CompactVocab, compact, expand

V = 512
USED = np.array([3, 7, 8, 40, 41, 99, 200, 201, 300, 511])


@pytest.fixture(scope="module")
def tied_model(tiny_config):
    assert tiny_config.vocab_size == V
    model = gj.init_model(tiny_config, seed=1, dtype=jnp.float32, experts="dense")
    unemb = np.array(model.unembedding[...])
    unseen = np.setdiff1d(np.arange(V), USED)
    unemb[unseen] = unemb[0] * 0.5  # any common row, not only zeros
    model.unembedding[...] = jnp.asarray(unemb)
    return model


def _batch(tokens):
    rng = np.random.default_rng(0)
    B, L = tokens.shape[0], tokens.shape[1] - 1
    return {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]),
            "weights": jnp.asarray((rng.random((B, L)) < 0.7).astype(np.float32)),
            "segment_ids": jnp.ones((B, L), jnp.int32), "positions": jnp.broadcast_to(jnp.arange(L), (B, L))}


def test_compact_losses_and_gradients_equal_the_full_vocabulary(tied_model):
    tokens = np.random.default_rng(1).choice(USED, size=(2, 41))
    vocab = CompactVocab.of([tokens], V)
    assert vocab.used == tuple(USED) and vocab.size == len(USED) + 1 and vocab.tied_rows == V - len(USED)
    small = compact(tied_model, vocab)
    assert small.config.vocab_size == vocab.size and small.unembedding[...].shape == (vocab.size, 64)

    def loss(model, batch, tied):
        total, n = token_losses(model, batch, chunk=16, tied_rows=tied)
        return total / n

    def grads(model, batch, tied):  # compiled: op by op, the backward pass of 3 layers takes minutes on 2 cores
        graphdef, params = nnx.split(model)
        return jax.jit(jax.value_and_grad(lambda p, b: loss(nnx.merge(graphdef, p), b, tied)))(params, batch)

    full_loss, g_full = grads(tied_model, _batch(tokens), 0)
    small_loss, g_small = grads(small, _batch(vocab.encode(tokens)), vocab.tied_rows)
    np.testing.assert_allclose(small_loss, full_loss, rtol=1e-6)
    full, part = dict(nnx.to_flat_state(g_full)), dict(nnx.to_flat_state(g_small))
    unseen = np.setdiff1d(np.arange(V), USED)
    u_full = np.asarray(full.pop(("unembedding",)).get_value())
    u_small = np.asarray(part.pop(("unembedding",)).get_value())
    np.testing.assert_allclose(u_small[:-1], u_full[USED], rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(u_small[-1], u_full[unseen[0]], rtol=1e-3, atol=1e-9)  # one tied row's gradient
    np.testing.assert_allclose(u_full[unseen], np.broadcast_to(u_full[unseen[0]], u_full[unseen].shape), rtol=1e-5,
                               atol=1e-12)  # the full model's tied rows stay tied
    e_full = np.asarray(full.pop(("embedding",)).get_value())
    np.testing.assert_allclose(np.asarray(part.pop(("embedding",)).get_value())[:-1], e_full[USED], rtol=1e-3,
                               atol=1e-6)
    assert not e_full[unseen].any()
    for path, g in full.items():
        np.testing.assert_allclose(part[path].get_value(), g.get_value(), rtol=1e-3, atol=1e-6, err_msg=str(path))


def test_expand_restores_the_full_model(tied_model):
    vocab = CompactVocab(tuple(int(t) for t in USED), V)
    back = expand(compact(tied_model, vocab), vocab, tied_model.embedding[...])
    assert back.config == tied_model.config
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(back)), nnx.to_flat_state(nnx.state(tied_model))):
        np.testing.assert_array_equal(a.get_value(), b.get_value(), err_msg=str(path))


def test_untied_rows_are_refused(tied_model):
    model = nnx.clone(tied_model)
    model.unembedding[...] = model.unembedding[...].at[5].add(1.0)
    with pytest.raises(RunError, match="1 of them differ from the first"):
        compact(model, CompactVocab(tuple(int(t) for t in USED), V))


def test_encode_maps_used_tokens_in_order_and_the_rest_to_the_extra_row():
    vocab = CompactVocab.of([USED[::-1], USED[:3]], V)
    assert vocab.used == tuple(int(t) for t in USED) and vocab.size == len(USED) + 1
    tokens = np.array([[511, 3, 4], [0, 200, 510]])
    np.testing.assert_array_equal(vocab.encode(tokens), [[9, 0, 10], [10, 6, 10]])
    assert vocab.encode(tokens).dtype == np.int32
