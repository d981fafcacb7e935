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
from gptoss_kernels.attention_pallas import (_block_ranges, _GpuCfg, _key_blocks, _needed_blocks, _query_blocks,
                                            decode_attention, flash_attention)

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


def _segments(T, cuts):
    """[1, T] int32 segment ids: a new segment starts at each cut (packed training rows)."""
    return jnp.asarray(np.searchsorted(np.array(cuts), np.arange(T), side="right")[None], jnp.int32)


# backend, T, K, G, window, block_q, block_k, segment starts. Segments that start inside and on block edges, one
# shorter than a block, one longer than the window.
SEGMENT_CASES = [
    ("gpu", 100, 2, 2, 0, 16, 32, [5, 32, 33, 70]),
    ("gpu", 90, 1, 8, 16, 32, 16, [20, 64]),
    ("gpu", 77, 2, 1, 40, 16, 16, [1, 50]),
    ("tpu", 200, 1, 2, 0, 128, 128, [60, 128, 129]),
]


@pytest.mark.parametrize("backend,T,K,G,window,block_q,block_k,cuts", SEGMENT_CASES)
def test_flash_segments_match_twin(backend, T, K, G, window, block_q, block_k, cuts):
    """Packed rows: forward and all gradients equal the twin's with the same segment ids."""
    q, k, v, sinks = _inputs(T + 1, 1, T, T, K, G, 32)
    seg = _segments(T, cuts)
    kernel = lambda *a: flash_attention(*a, window=window, sm_scale=SM_SCALE, interpret=True, backend=backend,
                                        block_q=block_q, block_k=block_k, segment_ids_BT=seg)
    twin = lambda *a: attention_xla(*a, window=window, sm_scale=SM_SCALE, segment_ids_BT=seg)
    out, grads = _value_and_grads(kernel, q, k, v, sinks)
    out_ref, grads_ref = _value_and_grads(twin, q, k, v, sinks)
    np.testing.assert_allclose(out, out_ref, **TOL)
    for name, g, g_ref in zip(("dq", "dk", "dv", "dsinks"), grads, grads_ref):
        np.testing.assert_allclose(g, g_ref, **TOL, err_msg=name)
    # The segments matter: without them the output differs.
    unpacked = attention_xla(q, k, v, sinks, window=window, sm_scale=SM_SCALE)
    assert float(jnp.abs(out_ref - unpacked).max()) > 1e-2


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


def _chunk_positions(kind, starts, ns, slots, T):
    """Positions as `kvcache.attend` gives them for a chunk of T new tokens per row (row b: `ns[b]` real tokens
    from position `starts[b]`, the rest padding; every query keeps its position start + t).
    full: the cache after the chunk is written (slot = position, empty past start + n).
    ring: a ring of `slots` slots as it was before the chunk (slot s holds the newest position = s mod slots), then
    the chunk's own keys (-1 for padding)."""
    starts, ns = np.array(starts)[:, None], np.array(ns)[:, None]
    t, s = np.arange(T)[None], np.arange(slots)[None]
    q_pos = starts + t
    if kind == "full":
        k_pos = np.where(s < starts + ns, s, -1)
    else:
        last = starts - 1
        ring = last - np.mod(last - s, slots)
        k_pos = np.concatenate([np.where(ring >= 0, ring, -1), np.where(t < ns, starts + t, -1)], axis=1)
    return jnp.asarray(q_pos, jnp.int32), jnp.asarray(k_pos, jnp.int32)


# backend, kind, T, K, G, window, starts, ns, slots, block_q, block_k. Rows: a chunk at 0 (prefill), chunks
# after a cached prefix (ragged: padding queries past n), a row with nothing at all (start 0, n 0: zeros).
# TPU takes its chunk kernel above 16 rows (T*G); small blocks give several query and key blocks, so the
# skipping of key blocks (empty tail, future slots, outside the window) is exercised.
CHUNK_CASES = [
    ("gpu", "full", 40, 2, 4, 0, [0, 100, 37, 0], [40, 17, 40, 0], 384, 32, 16),
    ("gpu", "full", 24, 1, 8, 50, [0, 200, 90, 0], [24, 24, 5, 0], 384, 64, 32),   # window on a full cache
    ("gpu", "ring", 40, 2, 4, 16, [0, 5, 37, 0], [40, 17, 40, 0], 16, 32, 16),
    ("tpu", "full", 40, 2, 4, 0, [0, 100, 37, 0], [40, 17, 40, 0], 384, 64, 128),
    ("tpu", "full", 24, 1, 8, 50, [0, 200, 90, 0], [24, 24, 5, 0], 512, 64, 128),
    ("tpu", "ring", 40, 2, 4, 16, [0, 5, 37, 0], [40, 17, 40, 0], 16, 64, 128),
    ("tpu", "full", 3, 2, 8, 0, [0, 100, 37, 0], [3, 2, 3, 0], 384, 512, 128),   # 24 rows: one query block
]


@pytest.mark.parametrize("backend,kind,T,K,G,window,starts,ns,slots,block_q,block_k", CHUNK_CASES)
def test_chunk_matches_twin(backend, kind, T, K, G, window, starts, ns, slots, block_q, block_k):
    """Prefill chunks over a KV cache (many queries a row): the tiled path of `decode_attention`."""
    q_pos, k_pos = _chunk_positions(kind, starts, ns, slots, T)
    B, S = k_pos.shape
    q, k, v, sinks = _inputs(S + T + window, B, T, S, K, G, 32)
    kw = dict(window=window, sm_scale=SM_SCALE, q_pos_BT=q_pos, k_pos_BS=k_pos)
    out = _run(lambda *a: decode_attention(*a, **kw, interpret=True, backend=backend, block_q=block_q,
                                           block_k=block_k), q, k, v, sinks)
    out_ref = attention_xla(q, k, v, sinks, **kw)
    np.testing.assert_allclose(out, out_ref, **TOL)
    assert float(jnp.abs(out[3]).max()) == 0.0  # the empty row: zeros, not NaN


@pytest.mark.parametrize("kind,window,block_q,block_k", [("full", 0, 64, 64), ("full", 128, 128, 128),
                                                         ("ring", 128, 64, 128), ("ring", 16, 16, 32)])
def test_block_ranges_cover_every_visible_key(kind, window, block_q, block_k):
    """Every (query row, key) pair that is visible lies in a key block inside its query block's [lo, hi): the
    skipping drops nothing. And on a full cache it skips: the empty tail and the blocks after the last query."""
    T, G, slots = 256, 4, 1024 if kind == "full" else window
    q_pos, k_pos = _chunk_positions(kind, [0, 300, 517, 0], [256, 100, 256, 0], slots, T)
    S = k_pos.shape[1]
    Sp = -(-S // block_k) * block_k
    k_pos = jnp.pad(k_pos, ((0, 0), (0, Sp - S)), constant_values=-1)
    rows = jnp.repeat(q_pos, G, axis=1)  # row r = t*G + g
    needed = _needed_blocks(rows.reshape(4, -1, block_q), k_pos.reshape(4, -1, block_k), window)
    lo, hi = (np.asarray(x) for x in _block_ranges(needed))
    visible = np.asarray(band_mask(rows, k_pos, window))  # [B, rows, Sp]
    for b in range(4):
        for i in range(lo.shape[1]):
            cols = np.nonzero(visible[b, i * block_q:(i + 1) * block_q].any(axis=0))[0] // block_k
            if cols.size:
                assert lo[b, i] <= cols.min() and cols.max() < hi[b, i], (b, i)
    assert (hi == lo)[3].all()  # the empty row visits nothing
    if kind == "full":  # row 0 (a prefill from 0): query block i needs the key blocks up to its last position only
        assert (hi - lo)[0].sum() < 0.6 * lo.shape[1] * (Sp // block_k)


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


def _decode(backend, window, slots, Td=1):
    Bd = 4
    fn = lambda q, k, v, s, qp, kp: decode_attention(q, k, v, s, window=window, sm_scale=SM_SCALE, q_pos_BT=qp,
                                                     k_pos_BS=kp, backend=backend)
    return fn, (_spec(Bd, Td, K, G, H), _spec(Bd, slots, K, H), _spec(Bd, slots, K, H),
                _spec(K, G, dtype=jnp.float32), _spec(Bd, Td, dtype=jnp.int32), _spec(Bd, slots, dtype=jnp.int32)), 1


VARIANTS = {
    "flash_full": lambda be: _flash_fwd(be, 0),
    "flash_window128": lambda be: _flash_fwd(be, 128),
    "flash_grad_full": lambda be: _flash_grad(be, 0),
    "flash_grad_window128": lambda be: _flash_grad(be, 128),
    "decode_full_cache": lambda be: _decode(be, 0, 1024 + 1),   # cache slots + the new token's key
    "decode_ring": lambda be: _decode(be, 128, 128 + 1),
    "chunk_full_cache": lambda be: _decode(be, 0, 1024, Td=64),  # a prefill chunk: the tiled kernels
    "chunk_ring": lambda be: _decode(be, 128, 128 + 64, Td=64),
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
