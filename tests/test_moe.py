import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gptoss_jax as gj
from gptoss_jax import mxfp4
from gptoss_jax.model import MoE, swiglu
from gptoss_kernels.moe import grouped_matmul_xla


def _packed(rng, E, N, K):
    blocks = rng.integers(0, 256, (E, N, K // 2), dtype=np.uint8)
    scales = rng.integers(120, 125, (E, N, K // 32), dtype=np.uint8)
    return mxfp4.Packed(jnp.asarray(blocks), jnp.asarray(scales)), mxfp4.decode_np(blocks, scales)


@pytest.mark.parametrize("sizes", [
    [0, 3, 0, 1, 4],  # empty experts, a one-token group
    [130, 0, 1, 129, 0],  # groups straddling 128-row tiles
    [0, 0, 7, 0, 0],
    [1, 1, 1, 1, 1],
])
@pytest.mark.parametrize("packed", [True, False])
def test_grouped_matmul_matches_per_row_reference(sizes, packed):
    rng = np.random.default_rng(sum(sizes))
    E, N, K = len(sizes), 48, 64
    w, w_dense = _packed(rng, E, N, K)
    if not packed:
        w = jnp.asarray(w_dense)
    M = sum(sizes)
    x = rng.normal(size=(M, K)).astype(np.float32)
    bias = rng.normal(size=(E, N)).astype(np.float32)
    out = np.asarray(grouped_matmul_xla(jnp.asarray(x), jnp.asarray(sizes), w, jnp.asarray(bias)))
    expert_of_row = np.repeat(np.arange(E), sizes)
    expected = np.stack([w_dense[e] @ x[m] + bias[e] for m, e in enumerate(expert_of_row)])
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_grouped_matmul_leaves_rows_past_the_groups_zero_and_is_differentiable():
    rng = np.random.default_rng(0)
    _, w = _packed(rng, 3, 16, 32)
    x = jnp.asarray(rng.normal(size=(10, 32)).astype(np.float32))
    sizes, bias = jnp.asarray([2, 0, 5]), jnp.zeros((3, 16))
    out = grouped_matmul_xla(x, sizes, jnp.asarray(w), bias)
    assert not np.asarray(out[7:]).any()
    gx, gw = jax.grad(lambda x, w: grouped_matmul_xla(x, sizes, w, bias).sum(), argnums=(0, 1))(x, jnp.asarray(w))
    np.testing.assert_allclose(np.asarray(gx[:2]), np.broadcast_to(w[0].sum(0), (2, 32)), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(gw[1]), 0)
    np.testing.assert_allclose(np.asarray(gw[2]), np.broadcast_to(np.asarray(x[2:7]).sum(0), (16, 32)), rtol=1e-5)


def test_swiglu_clamps_interleaves_and_adds_one():
    h = jnp.asarray([[9.0, 9.0, -3.0, -9.0, 0.5, 2.0]])  # (gate, linear) pairs
    out = np.asarray(swiglu(h, 1.702, 7.0))
    sig = lambda x: 1 / (1 + np.exp(-1.702 * x))  # noqa: E731
    np.testing.assert_allclose(out[0], [7 * sig(7) * 8, -3 * sig(-3) * (-6), 0.5 * sig(0.5) * 3], rtol=1e-6)


def naive_moe(x, cfg, p):
    """docs/spec.md's MoE for one token at a time: top-k raw logits, softmax over those k, interleaved SwiGLU."""
    out = []
    for t in x:
        n = t / np.sqrt(np.mean(t * t) + cfg.rms_norm_eps) * p["scale"]
        logits = p["gate_w"] @ n + p["gate_b"]
        chosen = np.argsort(-logits)[: cfg.experts_per_token]
        weights = np.exp(logits[chosen] - logits[chosen].max())
        weights /= weights.sum()
        y = np.zeros_like(t)
        for e, wgt in zip(chosen, weights):
            h = p["w1"][e] @ n + p["b1"][e]
            gate, lin = np.minimum(h[0::2], cfg.swiglu_limit), np.clip(h[1::2], -cfg.swiglu_limit, cfg.swiglu_limit)
            a = gate / (1 + np.exp(-cfg.swiglu_alpha * gate)) * (lin + 1)
            y += wgt * (p["w2"][e] @ a + p["b2"][e])
        out.append(t + y)
    return np.stack(out)


def test_moe_block_matches_the_naive_formula():
    cfg = dataclasses.replace(gj.ModelConfig.tiny(), num_experts=8, experts_per_token=3)
    moe = MoE(cfg, jnp.float32, "mxfp4", nnx.Rngs(3))
    p = {"scale": np.asarray(moe.norm.scale[...]), "gate_w": np.asarray(moe.gate_w[...]),
         "gate_b": np.asarray(moe.gate_b[...]), "b1": np.asarray(moe.mlp1_b[...]),
         "b2": np.asarray(moe.mlp2_b[...]),
         "w1": mxfp4.decode_np(np.asarray(moe.mlp1.blocks[...]), np.asarray(moe.mlp1.scales[...])),
         "w2": mxfp4.decode_np(np.asarray(moe.mlp2.blocks[...]), np.asarray(moe.mlp2.scales[...]))}
    x = np.random.default_rng(0).normal(size=(2, 37, cfg.hidden_size)).astype(np.float32) * 3
    out = np.asarray(moe(jnp.asarray(x)))
    np.testing.assert_allclose(out.reshape(-1, cfg.hidden_size), naive_moe(x.reshape(-1, cfg.hidden_size), cfg, p),
                               rtol=1e-4, atol=1e-4)
    # The router's softmax runs over the chosen k only: a softmax over all experts first would differ.
    assert np.abs(out).max() > 0
