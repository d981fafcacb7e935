"""The Pallas attention kernels against their twin `attention_xla`: interpret mode on CPU, plus lowering for TPU
and CUDA with `jax.export` (no accelerator needed).

Tolerance (float32 throughout): the kernels sum the same float32 terms in another order (blockwise online softmax,
rescaled running sums, gradients accumulated block by block), so they differ from the twin by a few float32 ulps
of the largest terms: at most 3e-6 absolute (1e-6 relative to the largest value) seen here, in dk/dv, sums over
up to 300 rows. 3e-5 absolute + relative leaves a margin of 10x; a masking slip (one key too many or too few)
moves outputs by ~1e-2 and a missed sink by ~1e-1.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptoss_kernels.attention import attention_xla, band_mask
from gptoss_kernels.attention_pallas import _GpuCfg, _key_blocks, _query_blocks, decode_attention, flash_attention

TOL = dict(rtol=3e-5, atol=3e-5)
SM_SCALE = 0.125
SINKS_OFF = -1e30  # a sink column that carries no mass


def _inputs(seed, B, T, S, K, G, H, sinks_on=True):
    kq, kk, kv, ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(kq, (B, T, K, G, H), jnp.float32)
    k = jax.random.normal(kk, (B, S, K, H), jnp.float32)
    v = jax.random.normal(kv, (B, S, K, H), jnp.float32)
    # Sinks comparable to the scores (|s| ~ a few) so that they carry a real share of the softmax.
    sinks = 2.0 * jax.random.normal(ks, (K, G), jnp.float32) if sinks_on else jnp.full((K, G), SINKS_OFF)
    return q, k, v, sinks


def _run(fn, *args):
    """jit and run once with XLA's backend optimisations off: an interpret-mode kernel is a large program run
    once, so compiling dominates (this cuts it by ~40%)."""
    return jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0})(*args)


def _value_and_grads(fn, q, k, v, sinks):
    """Output and the gradients of <out, fixed random cotangent> for q, k, v and the sinks, in one program."""
    def run(q, k, v, sinks):
        out, vjp = jax.vjp(fn, q, k, v, sinks)
        return out, vjp(jax.random.normal(jax.random.key(7), out.shape, out.dtype))
    return _run(run, q, k, v, sinks)


# backend, T, K, G, window, block_q, block_k, sinks_on. GPU blocks are small to get many blocks from short
# sequences; splash (TPU) needs blocks of 128. T is never a multiple of the blocks.
FLASH_CASES = [
    ("gpu", 100, 2, 1, 0, 16, 32, True),    # full causal, plain multi-head
    ("gpu", 90, 1, 8, 32, 32, 32, True),    # window == block, GQA group 8
    ("gpu", 77, 1, 2, 40, 32, 16, False),   # window that divides no block, sinks off
    ("gpu", 70, 2, 2, 7, 16, 16, True),     # window smaller than a block
    ("tpu", 200, 1, 8, 0, 128, 128, True),
    ("tpu", 200, 2, 2, 100, 128, 128, False),  # window smaller than and not dividing the block, sinks off
    ("tpu", 300, 1, 2, 128, 128, 128, True),   # window == block (gpt-oss)
]


@pytest.mark.parametrize("backend,T,K,G,window,block_q,block_k,sinks_on", FLASH_CASES)
def test_flash_matches_twin(backend, T, K, G, window, block_q, block_k, sinks_on):
    q, k, v, sinks = _inputs(T + window, 1, T, T, K, G, 32, sinks_on)
    kernel = lambda *a: flash_attention(*a, window=window, sm_scale=SM_SCALE, interpret=True, backend=backend,
                                        block_q=block_q, block_k=block_k)
    twin = lambda *a: attention_xla(*a, window=window, sm_scale=SM_SCALE)
    out, grads = _value_and_grads(kernel, q, k, v, sinks)
    out_ref, grads_ref = _value_and_grads(twin, q, k, v, sinks)
    np.testing.assert_allclose(out, out_ref, **TOL)
    for name, g, g_ref in zip(("dq", "dk", "dv", "dsinks"), grads, grads_ref):
        np.testing.assert_allclose(g, g_ref, **TOL, err_msg=name)
    if sinks_on:  # the sink gradient is really exercised
        assert float(jnp.abs(grads_ref[3]).max()) > 1e-2


def test_window_127_is_not_128():
    """Off by one in the window changes every query from position 127 on, and nothing before."""
    T = 160
    q, k, v, sinks = _inputs(3, 1, T, T, 1, 2, 16)
    outs = {w: _run(lambda *a, w=w: flash_attention(*a, window=w, sm_scale=SM_SCALE, interpret=True,
                                                     backend="gpu", block_q=32, block_k=32), q, k, v, sinks)
            for w in (127, 128)}
    for w, out in outs.items():
        np.testing.assert_allclose(out, attention_xla(q, k, v, sinks, window=w, sm_scale=SM_SCALE), **TOL)
    diff_T = jnp.abs(outs[127] - outs[128]).max(axis=(0, 2, 3, 4))
    assert float(diff_T[:127].max()) == 0.0
    assert float(diff_T[127:].min()) > 1e-3


@pytest.mark.parametrize("T,window,block_q,block_k", [(1024, 128, 64, 64), (1024, 0, 32, 64), (960, 40, 64, 16),
                                                      (512, 7, 16, 32)])
def test_gpu_block_ranges_are_the_band(T, window, block_q, block_k):
    """The (query block, key block) pairs the GPU kernels visit are exactly those holding a visible pair: nothing
    is missed, and everything else is skipped, so a sliding layer costs O(T x window)."""
    cfg = _GpuCfg(window, SM_SCALE, block_q, block_k, 4, 2, True)
    nq, nk = T // block_q, T // block_k
    visible = np.asarray(band_mask(jnp.arange(T), jnp.arange(T), window))
    needed = visible.reshape(nq, block_q, nk, block_k).any(axis=(1, 3))
    by_query = np.zeros((nq, nk), bool)
    for i in range(nq):
        lo, hi = _key_blocks(i, cfg)
        by_query[i, int(lo):int(hi)] = True
    by_key = np.zeros((nq, nk), bool)
    for j in range(nk):
        lo, hi = _query_blocks(j, nq, cfg)
        by_key[int(lo):int(hi), j] = True
    np.testing.assert_array_equal(by_query, needed)
    np.testing.assert_array_equal(by_key, needed)
    if window:
        assert needed.sum() <= nq * (-(-(window + block_q) // block_k) + 1)


def _full_cache_positions(lengths, slots):
    """Slot = position; the newest token (position = length) is appended as one extra key; a length of -1 marks a
    row with no keys at all (its query must come out as zeros)."""
    s = np.arange(slots)
    cache = np.where(s[None] < np.array(lengths)[:, None], s[None], -1)
    new = np.array([[n if n >= 0 else -1] for n in lengths])
    return np.concatenate([cache, new], axis=1), np.maximum(np.array(lengths), 0)[:, None]


def _ring_positions(lengths, slots, T):
    """A ring of `slots` slots after `length` tokens (slot s holds the newest position = s mod slots), then the T
    new tokens' own keys; queries at length .. length + T - 1."""
    s = np.arange(slots)
    last = np.array(lengths)[:, None] - 1
    ring = last - np.mod(last - s[None], slots)
    ring = np.where(ring >= 0, ring, -1)
    new = np.array(lengths)[:, None] + np.arange(T)[None]
    return np.concatenate([ring, new], axis=1), new


# backend, kind, T, K, G, window, lengths, slots, block_k
DECODE_CASES = [
    ("gpu", "full", 1, 2, 8, 0, [23, 40, -1], 40, 16),
    ("gpu", "ring", 2, 1, 4, 16, [5, 37, 16], 16, 16),
    ("tpu", "full", 1, 2, 8, 0, [23, 40, -1], 40, 512),     # one block holding all the slots
    ("tpu", "full", 1, 1, 8, 0, [150, 300, 0], 300, 128),   # three 128-slot blocks, padded
    ("tpu", "ring", 2, 1, 4, 16, [5, 37, 16], 16, 512),
]


@pytest.mark.parametrize("backend,kind,T,K,G,window,lengths,slots,block_k", DECODE_CASES)
def test_decode_matches_twin(backend, kind, T, K, G, window, lengths, slots, block_k):
    if kind == "full":
        k_pos, q_pos = _full_cache_positions(lengths, slots)
    else:
        k_pos, q_pos = _ring_positions(lengths, slots, T)
    B, S = k_pos.shape
    q, k, v, sinks = _inputs(S + T, B, T, S, K, G, 32)
    k_pos, q_pos = jnp.asarray(k_pos, jnp.int32), jnp.asarray(q_pos, jnp.int32)
    kw = dict(window=window, sm_scale=SM_SCALE, q_pos_BT=q_pos, k_pos_BS=k_pos)
    out = _run(lambda *a: decode_attention(*a, **kw, interpret=True, backend=backend, block_k=block_k,
                                           num_splits=3), q, k, v, sinks)
    out_ref = attention_xla(q, k, v, sinks, **kw)
    np.testing.assert_allclose(out, out_ref, **TOL)
    if -1 in lengths:  # a row that sees nothing: zeros, not NaN
        assert float(jnp.abs(out[lengths.index(-1)]).max()) == 0.0


# Lowering: gpt-oss head shapes (K 8, G 8, H 64) in bf16, no hardware needed.
B, T, K, G, H = 1, 256, 8, 8, 64
TRITON = "__gpu$xla.gpu.triton"
PLATFORMS = {"tpu": ("tpu", "tpu_custom_call", []),
             "gpu": ("cuda", TRITON, [jax.export.DisabledSafetyCheck.custom_call(TRITON)])}


def _spec(*shape, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype)


def _flash_fwd(backend, window):
    return (lambda q, k, v, s: flash_attention(q, k, v, s, window=window, sm_scale=SM_SCALE, backend=backend),
            (_spec(B, T, K, G, H), _spec(B, T, K, H), _spec(B, T, K, H), _spec(K, G, dtype=jnp.float32)), 1)


def _flash_grad(backend, window):
    def grads(q, k, v, s):
        loss = lambda *a: flash_attention(*a, window=window, sm_scale=SM_SCALE, backend=backend).astype(
            jnp.float32).sum()
        return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, s)
    # Forward, dq and dk/dv kernels (splash: forward, dq, dkv).
    return grads, _flash_fwd(backend, window)[1], 3


def _decode(backend, window, slots):
    Bd = 4
    fn = lambda q, k, v, s, qp, kp: decode_attention(q, k, v, s, window=window, sm_scale=SM_SCALE, q_pos_BT=qp,
                                                     k_pos_BS=kp, backend=backend)
    return fn, (_spec(Bd, 1, K, G, H), _spec(Bd, slots, K, H), _spec(Bd, slots, K, H),
                _spec(K, G, dtype=jnp.float32), _spec(Bd, 1, dtype=jnp.int32), _spec(Bd, slots, dtype=jnp.int32)), 1


VARIANTS = {
    "flash_full": lambda be: _flash_fwd(be, 0),
    "flash_window128": lambda be: _flash_fwd(be, 128),
    "flash_grad_full": lambda be: _flash_grad(be, 0),
    "flash_grad_window128": lambda be: _flash_grad(be, 128),
    "decode_full_cache": lambda be: _decode(be, 0, 1024 + 1),   # cache slots + the new token's key
    "decode_ring": lambda be: _decode(be, 128, 128 + 1),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend", list(PLATFORMS))
def test_kernels_lower(backend, variant):
    platform, target, disabled = PLATFORMS[backend]
    fn, specs, n_kernels = VARIANTS[variant](backend)
    exported = jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=disabled)(*specs)
    text = exported.mlir_module()
    calls = re.findall(r"stablehlo\.custom_call @([\w$.]+)", text)
    assert calls.count(target) == n_kernels, calls
