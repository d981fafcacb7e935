"""Pallas kernels for causal attention with sinks and a sliding window; the twin is `attention.attention_xla`.

- `flash_attention`: a whole sequence (positions 0..T-1), optionally packed (segment ids), forward and backward
  (gradients for q, k, v and the sinks). TPU: JAX's splash attention (sinks built in, `LocalMask` for the window,
  `SegmentIds`), one MQA kernel per kv head. GPU: Triton kernels written here. Both skip key blocks outside the
  band, so a sliding layer costs O(T x window).
- `decode_attention`: T queries per row (a decode step or a prefill chunk) against KV-cache slots that carry their
  own positions (-1 = empty), so a ring buffer (slot = position mod window) needs nothing special. Query rows are
  tiled into blocks with an online softmax over key blocks, so no [T, S] score matrix exists; key blocks that no
  row of a query block can see (by position) are skipped. Forward only.

Shapes: B batch, T queries, S keys, K kv heads, G query heads per kv head, H head dim, R = T*G query rows of one kv
head (row r is query r // G of head g = r % G). Query head k*G + g reads kv head k; K/V are never repeated.
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

# Running-max start for rows that may see no key at all (decode): finite, so exp(-inf - m) = 0 and never NaN.
_NO_SCORE = -1e30
_F32 = jnp.float32


def _backend(backend: str | None) -> str:
    if backend is not None:
        if backend not in ("tpu", "gpu"):
            raise ValueError(f"backend must be 'tpu' or 'gpu', not {backend!r}")
        return backend
    platform = jax.default_backend()
    if platform == "tpu":
        return "tpu"
    if platform in ("gpu", "cuda", "rocm"):
        return "gpu"
    raise ValueError(f"no Pallas attention kernel for platform {platform!r}: use attention_xla, or pass "
                     "backend='tpu' or 'gpu' with interpret=True")


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _pad_axis(x, axis: int, size: int, value=0):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def _visible(q_pos_R1, k_pos_1S, window: int):
    """`attention.band_mask` on pre-broadcast operands (Mosaic has no cheap rank-1 vectors)."""
    diff = q_pos_R1 - k_pos_1S
    visible = (diff >= 0) & (k_pos_1S >= 0)
    if window:
        visible &= diff < window
    return visible


def _dot_nt(a, b):  # a @ b.T in float32
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=_F32)


def _dot_tn(a, b):  # a.T @ b in float32
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=_F32)


def _dot(a, b):
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=_F32)


# ---------------------------------------------------------------------------------------------------------------
# Whole-sequence flash attention, GPU (Triton). Layouts stay [B, T, K, G, H]: the BlockSpecs pick one head's rows.
# With segment ids (packed rows), each kernel also gets the [B, T] ids twice: its own block's and the whole row's
# (read block by block); a pair is visible only inside one segment.


class _GpuCfg(NamedTuple):
    window: int
    sm_scale: float
    block_q: int
    block_k: int
    num_warps: int
    num_stages: int
    interpret: bool


def _key_blocks(i, cfg: _GpuCfg):
    """Key blocks [lo, hi) that query block i can see: nothing above the diagonal, nothing before the window."""
    q0 = i * cfg.block_q
    hi = (q0 + cfg.block_q - 1) // cfg.block_k + 1
    lo = jnp.maximum(q0 - cfg.window + 1, 0) // cfg.block_k if cfg.window else 0
    return lo, hi


def _query_blocks(j, num_q_blocks: int, cfg: _GpuCfg):
    """Query blocks [lo, hi) that see key block j (the transpose of `_key_blocks`)."""
    k0 = j * cfg.block_k
    lo = k0 // cfg.block_q
    if not cfg.window:
        return lo, num_q_blocks
    return lo, jnp.minimum((k0 + cfg.block_k + cfg.window - 2) // cfg.block_q + 1, num_q_blocks)


def _flash_mask(q_pos, k_pos, q_seg, k_seg, window: int):
    """[rows, keys] visibility of a query block against a key block; segment ids (or None) as [rows], [keys]."""
    visible = _visible(q_pos[:, None], k_pos[None, :], window)
    if q_seg is not None:
        visible &= q_seg[:, None] == k_seg[None, :]
    return visible


def _split_seg_refs(refs, n_in: int, segmented: bool):
    """(inputs, (block seg ref, row seg ref) or (None, None), outputs) of a kernel's refs."""
    if not segmented:
        return refs[:n_in], (None, None), refs[n_in:]
    return refs[:n_in], refs[n_in:n_in + 2], refs[n_in + 2:]


def _fwd_kernel(*refs, cfg: _GpuCfg, segmented: bool):
    (sink_ref, q_ref, k_ref, v_ref), (qseg_ref, kseg_ref), (o_ref, lse_ref) = _split_seg_refs(refs, 4, segmented)
    i = pl.program_id(2)
    bq, bk = cfg.block_q, cfg.block_k
    q_RH = q_ref[...]
    q_pos = i * bq + jnp.arange(bq)
    q_seg = qseg_ref[...] if segmented else None

    def body(j, carry):
        m_R, l_R, acc_RH = carry
        keys = pl.ds(pl.multiple_of(j * bk, bk), bk)
        s_RS = _dot_nt(q_RH, k_ref[keys, :]) * cfg.sm_scale
        k_seg = kseg_ref[keys] if segmented else None
        s_RS = jnp.where(_flash_mask(q_pos, j * bk + jnp.arange(bk), q_seg, k_seg, cfg.window), s_RS, -jnp.inf)
        m_new = jnp.maximum(m_R, s_RS.max(axis=-1))
        alpha = jnp.exp(m_R - m_new)
        p_RS = jnp.exp(s_RS - m_new[:, None])
        v_SH = v_ref[keys, :]
        acc_RH = alpha[:, None] * acc_RH + _dot(p_RS.astype(v_SH.dtype), v_SH)
        return m_new, alpha * l_R + p_RS.sum(axis=-1), acc_RH

    # The sink is the softmax's first column: max starts at the sink and the sum at e^(sink - sink) = 1.
    sink = sink_ref[...].astype(_F32)
    init = (jnp.full((bq,), sink, _F32), jnp.ones((bq,), _F32), jnp.zeros(q_RH.shape, _F32))
    m_R, l_R, acc_RH = lax.fori_loop(*_key_blocks(i, cfg), body, init)
    o_ref[...] = (acc_RH / l_R[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m_R + jnp.log(l_R)  # log-sum-exp including the sink


def _dq_kernel(*refs, cfg: _GpuCfg, segmented: bool):
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), (qseg_ref, kseg_ref), (dq_ref,) = _split_seg_refs(
        refs, 6, segmented)
    i = pl.program_id(2)
    bq, bk = cfg.block_q, cfg.block_k
    q_RH, do_RH, lse_R, delta_R = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    q_pos = i * bq + jnp.arange(bq)
    q_seg = qseg_ref[...] if segmented else None

    def body(j, dq_RH):
        keys = pl.ds(pl.multiple_of(j * bk, bk), bk)
        k_SH, v_SH = k_ref[keys, :], v_ref[keys, :]
        s_RS = _dot_nt(q_RH, k_SH) * cfg.sm_scale
        k_seg = kseg_ref[keys] if segmented else None
        s_RS = jnp.where(_flash_mask(q_pos, j * bk + jnp.arange(bk), q_seg, k_seg, cfg.window), s_RS, -jnp.inf)
        p_RS = jnp.exp(s_RS - lse_R[:, None])
        ds_RS = p_RS * (_dot_nt(do_RH, v_SH) - delta_R[:, None])
        return dq_RH + _dot(ds_RS.astype(k_SH.dtype), k_SH)

    dq_RH = lax.fori_loop(*_key_blocks(i, cfg), body, jnp.zeros(q_RH.shape, _F32))
    dq_ref[...] = (dq_RH * cfg.sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, cfg: _GpuCfg, segmented: bool):
    """One key block of one kv head, summed over its G query heads: dK/dV come out per kv head directly."""
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), (kseg_ref, qseg_ref), (dk_ref, dv_ref) = _split_seg_refs(
        refs, 6, segmented)
    j = pl.program_id(2)
    bq, bk = cfg.block_q, cfg.block_k
    G, num_q_blocks = q_ref.shape[1], q_ref.shape[0] // bq
    k_SH, v_SH = k_ref[...], v_ref[...]
    k_pos = j * bk + jnp.arange(bk)
    k_seg = kseg_ref[...] if segmented else None
    lo, hi = _query_blocks(j, num_q_blocks, cfg)
    n = hi - lo

    def body(step, carry):  # step runs over (query head g, query block i)
        dk_SH, dv_SH = carry
        g, i = step // n, lo + step % n
        rows = pl.ds(pl.multiple_of(i * bq, bq), bq)
        q_RH, do_RH = q_ref[rows, g, :], do_ref[rows, g, :]
        lse_R, delta_R = lse_ref[g, rows], delta_ref[g, rows]
        s_RS = _dot_nt(q_RH, k_SH) * cfg.sm_scale
        q_seg = qseg_ref[rows] if segmented else None
        s_RS = jnp.where(_flash_mask(i * bq + jnp.arange(bq), k_pos, q_seg, k_seg, cfg.window), s_RS, -jnp.inf)
        p_RS = jnp.exp(s_RS - lse_R[:, None])
        dv_SH = dv_SH + _dot_tn(p_RS.astype(do_RH.dtype), do_RH)
        ds_RS = p_RS * (_dot_nt(do_RH, v_SH) - delta_R[:, None])
        return dk_SH + _dot_tn(ds_RS.astype(q_RH.dtype), q_RH), dv_SH

    zeros = jnp.zeros(k_SH.shape, _F32)
    dk_SH, dv_SH = lax.fori_loop(0, G * n, body, (zeros, zeros))
    dk_ref[...] = (dk_SH * cfg.sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_SH.astype(dv_ref.dtype)


def _triton_params(cfg: _GpuCfg):
    return pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _seg_specs(seg_BT, block: int, T: int):
    """BlockSpecs of the segment ids for a grid (b, head, block index): this block's ids, then the whole row's."""
    if seg_BT is None:
        return [], []
    specs = [pl.BlockSpec((None, block), lambda b, h, i: (b, i)), pl.BlockSpec((None, T), lambda b, h, i: (b, 0))]
    return specs, [seg_BT, seg_BT]


def _flash_gpu_fwd_call(q_BTKGH, k_BTKH, v_BTKH, sinks_KG, seg_BT, cfg: _GpuCfg):
    B, T, K, G, H = q_BTKGH.shape
    bq = cfg.block_q
    q_spec = pl.BlockSpec((None, bq, None, None, H), lambda b, h, i: (b, i, h // G, h % G, 0))
    kv_spec = pl.BlockSpec((None, T, None, H), lambda b, h, i: (b, 0, h // G, 0))
    seg_specs, segs = _seg_specs(seg_BT, bq, T)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg, segmented=seg_BT is not None),
        grid=(B, K * G, T // bq),
        in_specs=[pl.BlockSpec((None, None), lambda b, h, i: (h // G, h % G)), q_spec, kv_spec, kv_spec] + seg_specs,
        out_specs=[q_spec, pl.BlockSpec((None, None, None, bq), lambda b, h, i: (b, h // G, h % G, i))],
        out_shape=[jax.ShapeDtypeStruct(q_BTKGH.shape, q_BTKGH.dtype), jax.ShapeDtypeStruct((B, K, G, T), _F32)],
        compiler_params=_triton_params(cfg), interpret=cfg.interpret, name="flash_attention_sinks_fwd",
    )(sinks_KG, q_BTKGH, k_BTKH, v_BTKH, *segs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash_gpu(q_BTKGH, k_BTKH, v_BTKH, sinks_KG, seg_BT, cfg: _GpuCfg):
    return _flash_gpu_fwd_call(q_BTKGH, k_BTKH, v_BTKH, sinks_KG, seg_BT, cfg)[0]


def _flash_gpu_fwd(q_BTKGH, k_BTKH, v_BTKH, sinks_KG, seg_BT, cfg: _GpuCfg):
    o_BTKGH, lse_BKGT = _flash_gpu_fwd_call(q_BTKGH, k_BTKH, v_BTKH, sinks_KG, seg_BT, cfg)
    return o_BTKGH, (q_BTKGH, k_BTKH, v_BTKH, sinks_KG, seg_BT, o_BTKGH, lse_BKGT)


def _flash_gpu_bwd(cfg: _GpuCfg, res, do_BTKGH):
    q_BTKGH, k_BTKH, v_BTKH, sinks_KG, seg_BT, o_BTKGH, lse_BKGT = res
    B, T, K, G, H = q_BTKGH.shape
    bq, bk = cfg.block_q, cfg.block_k
    segmented = seg_BT is not None
    # delta = dO . O per row: the softmax backward's row term (O includes the sink's share of the mass).
    delta_BKGT = jnp.einsum("btkgh,btkgh->bkgt", do_BTKGH.astype(_F32), o_BTKGH.astype(_F32))
    # The sink is a logit whose value vector is 0: d sink = -sum over rows of p_sink * delta.
    p_sink_BKGT = jnp.exp(sinks_KG.astype(_F32)[None, :, :, None] - lse_BKGT)
    dsinks_KG = -(p_sink_BKGT * delta_BKGT).sum(axis=(0, 3)).astype(sinks_KG.dtype)

    q_spec = pl.BlockSpec((None, bq, None, None, H), lambda b, h, i: (b, i, h // G, h % G, 0))
    kv_spec = pl.BlockSpec((None, T, None, H), lambda b, h, i: (b, 0, h // G, 0))
    row_spec = pl.BlockSpec((None, None, None, bq), lambda b, h, i: (b, h // G, h % G, i))
    seg_specs, segs = _seg_specs(seg_BT, bq, T)
    dq_BTKGH = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, segmented=segmented),
        grid=(B, K * G, T // bq),
        in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec] + seg_specs,
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q_BTKGH.shape, q_BTKGH.dtype),
        compiler_params=_triton_params(cfg), interpret=cfg.interpret, name="flash_attention_sinks_dq",
    )(q_BTKGH, k_BTKH, v_BTKH, do_BTKGH, lse_BKGT, delta_BKGT, *segs)

    qs_spec = pl.BlockSpec((None, T, None, G, H), lambda b, k, j: (b, 0, k, 0, 0))  # all G heads of kv head k
    kb_spec = pl.BlockSpec((None, bk, None, H), lambda b, k, j: (b, j, k, 0))
    rows_spec = pl.BlockSpec((None, None, G, T), lambda b, k, j: (b, k, 0, 0))
    seg_specs, segs = _seg_specs(seg_BT, bk, T)  # this key block's ids, then all the queries'
    dk_BTKH, dv_BTKH = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg, segmented=segmented),
        grid=(B, K, T // bk),
        in_specs=[qs_spec, kb_spec, kb_spec, qs_spec, rows_spec, rows_spec] + seg_specs,
        out_specs=[kb_spec, kb_spec],
        out_shape=[jax.ShapeDtypeStruct(k_BTKH.shape, k_BTKH.dtype), jax.ShapeDtypeStruct(v_BTKH.shape, v_BTKH.dtype)],
        compiler_params=_triton_params(cfg), interpret=cfg.interpret, name="flash_attention_sinks_dkv",
    )(q_BTKGH, k_BTKH, v_BTKH, do_BTKGH, lse_BKGT, delta_BKGT, *segs)
    dseg = None if seg_BT is None else np.zeros(seg_BT.shape, jax.dtypes.float0)
    return dq_BTKGH, dk_BTKH, dv_BTKH, dsinks_KG, dseg


_flash_gpu.defvjp(_flash_gpu_fwd, _flash_gpu_bwd)


# ---------------------------------------------------------------------------------------------------------------
# Whole-sequence flash attention, TPU: splash attention, one MQA kernel (G query heads on one K/V) per kv head.


def _splash_kernel(T: int, G: int, window: int, block_q: int, block_k: int, interpret: bool):
    # Window w admits keys i - w < j <= i: splash's LocalMask with (left, right) = (w - 1, 0).
    mask = splash_mask.LocalMask((T, T), (window - 1, 0), 0) if window else splash_mask.CausalMask((T, T))
    sizes = splash.BlockSizes(block_q=block_q, block_kv=block_k, block_kv_compute=block_k, block_q_dkv=block_q,
                              block_kv_dkv=block_k, block_kv_dkv_compute=block_k, block_q_dq=block_q,
                              block_kv_dq=block_k)
    return splash.make_splash_mqa_single_device(splash_mask.MultiHeadMask([mask] * G), block_sizes=sizes,
                                                interpret=interpret)


def _flash_tpu(q_BTKGH, k_BTKH, v_BTKH, sinks_KG, segment_ids_BT, *, window, sm_scale, block_q, block_k, interpret):
    B, T, K, G, H = q_BTKGH.shape
    kernel = _splash_kernel(T, G, window, block_q, block_k, interpret)
    # Splash does not scale scores; scaling q first is exact for a power-of-two sm_scale (gpt-oss: 1/8).
    q_BKGTH = (q_BTKGH * jnp.asarray(sm_scale, q_BTKGH.dtype)).transpose(0, 2, 3, 1, 4)
    k_BKTH, v_BKTH = k_BTKH.transpose(0, 2, 1, 3), v_BTKH.transpose(0, 2, 1, 3)
    if segment_ids_BT is None:
        per_kv_head = jax.vmap(lambda q_GTH, k_TH, v_TH, s_G: kernel(q_GTH, k_TH, v_TH, sinks=s_G))
        o_BKGTH = jax.vmap(per_kv_head, in_axes=(0, 0, 0, None))(q_BKGTH, k_BKTH, v_BKTH, sinks_KG.astype(_F32))
    else:
        per_kv_head = jax.vmap(lambda q_GTH, k_TH, v_TH, s_G, seg: kernel(q_GTH, k_TH, v_TH, sinks=s_G,
                                                                           segment_ids=seg),
                               in_axes=(0, 0, 0, 0, None))
        segments = splash.SegmentIds(q=segment_ids_BT, kv=segment_ids_BT)
        o_BKGTH = jax.vmap(per_kv_head, in_axes=(0, 0, 0, None, 0))(q_BKGTH, k_BKTH, v_BKTH, sinks_KG.astype(_F32),
                                                                    segments)
    return o_BKGTH.transpose(0, 3, 1, 2, 4)


def flash_attention(q_BTKGH, k_BSKH, v_BSKH, sinks_KG, *, window: int, sm_scale: float, interpret: bool = False,
                    block_q: int | None = None, block_k: int | None = None, backend: str | None = None,
                    num_warps: int = 4, num_stages: int = 2, segment_ids_BT=None):
    """`attention_xla` for a whole sequence (positions 0..T-1, S == T), differentiable in q, k, v and the sinks.

    Key blocks outside the causal band are skipped. T need not be a multiple of the blocks (padded here; padded
    keys lie after every real query, so no real query sees them). Blocks default to 128 on TPU (splash needs
    multiples of 128) and 64 on GPU (Triton: powers of two, at least 16); num_warps/num_stages are Triton's.
    `segment_ids_BT` (packed training rows: a query sees only keys of its own segment): TPU through splash's
    SegmentIds, GPU in the Triton kernels (forward and backward).
    """
    B, T, K, G, H = q_BTKGH.shape
    if k_BSKH.shape != (B, T, K, H) or v_BSKH.shape != k_BSKH.shape or sinks_KG.shape != (K, G):
        raise ValueError(f"flash_attention wants q [B, T, K, G, H], k and v [B, T, K, H], sinks [K, G]; got "
                         f"{q_BTKGH.shape}, {k_BSKH.shape}, {v_BSKH.shape}, {sinks_KG.shape}")
    backend = _backend(backend)
    default_block = 128 if backend == "tpu" else 64
    block_q, block_k = block_q or default_block, block_k or default_block
    Tp = _round_up(T, max(block_q, block_k))
    q, k, v = (_pad_axis(x, 1, Tp) for x in (q_BTKGH, k_BSKH, v_BSKH))
    # Padded keys get their own segment, so no real query sees them in either direction.
    seg = None if segment_ids_BT is None else _pad_axis(segment_ids_BT.astype(jnp.int32), 1, Tp, value=-1)
    with jax.named_scope(f"flash_attention_{backend}_w{window}"):
        if backend == "tpu":
            out = _flash_tpu(q, k, v, sinks_KG, seg, window=window, sm_scale=sm_scale, block_q=block_q,
                             block_k=block_k, interpret=interpret)
        else:
            cfg = _GpuCfg(window, float(sm_scale), block_q, block_k, num_warps, num_stages, interpret)
            out = _flash_gpu(q, k, v, sinks_KG, seg, cfg)
    return out[:, :T]


# ---------------------------------------------------------------------------------------------------------------
# Attention over KV-cache slots: decode steps (a few queries a row) and prefill chunks (hundreds), by position.
# Every kernel visits only the key blocks that may hold a key visible to its query rows (`_block_ranges`): the
# empty tail of a cache and, for a sliding layer, the slots older than the window cost nothing.

# TPU: up to this many query rows per kv head (T*G: a decode step, or 2 queries of gpt-oss) take the all-heads
# block-diagonal kernel; more take the head-group kernel, which tiles the rows (prefill chunks).
TPU_DECODE_MAX_ROWS = 16
_BIG = 1 << 30  # a position beyond any real one


def _rows(q_BTKGH, q_pos_BT, rows: int):
    """[B, K, rows, H] query rows of each kv head (row r = t*G + g) and their positions [B, rows]; padding rows
    get position -1 and so see nothing."""
    B, T, K, G, H = q_BTKGH.shape
    q_BKRH = _pad_axis(q_BTKGH.transpose(0, 2, 1, 3, 4).reshape(B, K, T * G, H), 2, rows)
    return q_BKRH, _row_positions(q_pos_BT, G, rows)


def _row_positions(q_pos_BT, G: int, rows: int):
    """[B, rows]: the position of query row r = t*G + g, -1 for padding rows."""
    return _pad_axis(jnp.repeat(q_pos_BT.astype(jnp.int32), G, axis=1), 1, rows, -1)


def _row_sinks(sinks_KG, T: int, rows: int):
    """[K, rows] float32: the sink of query row r = t*G + g (head g's), padding rows 0."""
    return _pad_axis(jnp.tile(sinks_KG.astype(_F32), (1, T)), 1, rows)


def _needed_blocks(q_pos_BIR, k_pos_BJC, window: int):
    """[B, I, J] bool: whether key block j may hold a key visible to some row of query block i, judged from the
    blocks' position ranges (never misses a visible pair; may keep a block that holds none). Rows and slots at
    position -1 count for nothing, so a block of padding rows or of empty slots is never needed."""
    q_ok, k_ok = q_pos_BIR >= 0, k_pos_BJC >= 0
    q_lo = jnp.where(q_ok, q_pos_BIR, _BIG).min(axis=-1)[:, :, None]
    q_hi = jnp.where(q_ok, q_pos_BIR, -1).max(axis=-1)[:, :, None]
    k_lo = jnp.where(k_ok, k_pos_BJC, _BIG).min(axis=-1)[:, None, :]
    k_hi = jnp.where(k_ok, k_pos_BJC, -1).max(axis=-1)[:, None, :]
    needed = (k_hi >= 0) & (k_lo <= q_hi)  # some key not after some query
    if window:
        needed &= k_hi > q_lo - window  # some key inside some query's window
    return needed


def _block_ranges(needed_J):
    """(lo, hi) int32 over the last axis: the first needed block and one past the last; (0, 0) if none. Blocks
    in between are visited too (masked as usual): a ring buffer's slots are rotated, not ordered."""
    J = needed_J.shape[-1]
    some = needed_J.any(axis=-1)
    lo = jnp.argmax(needed_J, axis=-1)
    hi = J - jnp.argmax(needed_J[..., ::-1], axis=-1)
    return jnp.where(some, lo, 0).astype(jnp.int32), jnp.where(some, hi, 0).astype(jnp.int32)


def _clamp_block(j, lo, hi):
    """The key block grid step j reads: j held within [lo, hi - 1] (lo if the range is empty). Steps outside the
    range repeat a neighbour's block index, and the TPU pipeline fetches nothing for a repeated index."""
    return jnp.minimum(jnp.maximum(j, lo), jnp.maximum(hi - 1, lo))


def _merge_with_sink(o_BKNRH, lse_BKNR, sinks_KG, T: int):
    """Softmax-merge N partial results and the sink column; [B, T, K, G, H] float32."""
    B, K, _, _, H = o_BKNRH.shape
    G = sinks_KG.shape[1]
    o_BKNRH, lse_BKNR = o_BKNRH[:, :, :, :T * G], lse_BKNR[:, :, :, :T * G]
    sink_KR = jnp.tile(sinks_KG.astype(_F32), (1, T))
    lse_BKR = jnp.logaddexp(jax.nn.logsumexp(lse_BKNR, axis=2), sink_KR)  # -inf parts (no key) weigh 0
    o_BKRH = (jnp.exp(lse_BKNR - lse_BKR[:, :, None])[..., None] * o_BKNRH).sum(axis=2)
    return o_BKRH.reshape(B, K, T, G, H).transpose(0, 2, 1, 3, 4)


def _online_softmax_step(m_R, l_R, acc_RH, s_RS, v_SH):
    m_new = jnp.maximum(m_R, s_RS.max(axis=-1, keepdims=True))
    alpha = jnp.exp(m_R - m_new)
    p_RS = jnp.exp(s_RS - m_new)
    return m_new, alpha * l_R + p_RS.sum(axis=-1, keepdims=True), alpha * acc_RH + _dot(p_RS.astype(v_SH.dtype), v_SH)


def _finish(m_R1, l_R1, acc_RH):
    """Normalised output and log-sum-exp; a row that saw no key gets o = 0 and lse = -inf."""
    return acc_RH / jnp.where(l_R1 == 0, 1.0, l_R1), m_R1 + jnp.log(l_R1)


# GPU (Triton): one kernel for every T. Grid (B, K, query blocks, slot splits); each instance loops over the key
# blocks [lo, hi) of its split that its rows can see.


def _cache_gpu_kernel(*refs, sm_scale, window, block_k, fold_sink):
    if fold_sink:  # the slots are not split: the sink joins here and the output is final
        lo_ref, hi_ref, sink_ref, q_ref, q_pos_ref, k_ref, v_ref, k_pos_ref, o_ref = refs
    else:  # one split of the slots: a partial (o, lse) without the sink, merged in XLA
        lo_ref, hi_ref, q_ref, q_pos_ref, k_ref, v_ref, k_pos_ref, o_ref, lse_ref = refs
    q_RH = q_ref[...]
    q_pos_R1 = q_pos_ref[...][:, None]

    def body(j, carry):
        keys = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
        s_RS = _dot_nt(q_RH, k_ref[keys, :]) * sm_scale
        s_RS = jnp.where(_visible(q_pos_R1, k_pos_ref[keys][None, :], window), s_RS, -jnp.inf)
        return _online_softmax_step(*carry, s_RS, v_ref[keys, :])

    R, H = q_RH.shape
    if fold_sink:
        # The sink is the softmax's first column: the max starts at the sink and the sum at e^(sink - sink) = 1,
        # so a row that sees no key comes out 0.
        init = (sink_ref[...][:, None], jnp.ones((R, 1), _F32), jnp.zeros((R, H), _F32))
    else:
        init = (jnp.full((R, 1), _NO_SCORE, _F32), jnp.zeros((R, 1), _F32), jnp.zeros((R, H), _F32))
    m_R1, l_R1, acc_RH = lax.fori_loop(lo_ref[...], hi_ref[...], body, init)
    if fold_sink:
        o_ref[...] = (acc_RH / l_R1).astype(o_ref.dtype)
    else:
        o_RH, lse_R1 = _finish(m_R1, l_R1, acc_RH)
        o_ref[...] = o_RH
        lse_ref[...] = lse_R1[:, 0]


def _cache_gpu(q_BTKGH, k_BSKH, v_BSKH, sinks_KG, q_pos_BT, k_pos_BS, *, window, sm_scale, block_q, block_k,
               num_splits, interpret, num_warps, num_stages):
    """When all T*G rows of a kv head fit one query block (decode), the slots are cut into `num_splits` parts for
    parallelism and the partial results merged in XLA (flash-decoding). Otherwise (prefill chunks) the rows are
    tiled into blocks of `block_q`, each a grid instance over all the slots, and the sink joins in the kernel."""
    B, T, K, G, H = q_BTKGH.shape
    S = k_BSKH.shape[1]
    rows = max(16, pl.next_power_of_2(T * G))  # Triton dots need >= 16 rows
    if rows <= block_q:
        block_q, num_q = rows, 1
        # No more splits than whole key blocks: a 128-slot ring in 4 splits of 64 would be padded (copied) to 256.
        num_splits = max(1, min(num_splits, S // block_k))
    else:
        num_q, num_splits = -(-T * G // block_q), 1
    Rp = num_q * block_q
    q_BKRH, q_pos_BR = _rows(q_BTKGH, q_pos_BT, Rp)
    chunk = _round_up(-(-S // num_splits), block_k)
    Sp = chunk * num_splits
    # Reshapes, free when S already fills the splits; empty padding slots have position -1.
    k_BNCKH, v_BNCKH = (_pad_axis(x, 1, Sp).reshape(B, num_splits, chunk, K, H) for x in (k_BSKH, v_BSKH))
    k_pos_BNC = _pad_axis(k_pos_BS.astype(jnp.int32), 1, Sp, -1).reshape(B, num_splits, chunk)
    per_split = chunk // block_k
    needed = _needed_blocks(q_pos_BR.reshape(B, num_q, block_q), k_pos_BNC.reshape(B, Sp // block_k, block_k),
                            window)
    lo_BIN, hi_BIN = _block_ranges(needed.reshape(B, num_q, num_splits, per_split))

    fold_sink = num_splits == 1
    range_spec = pl.BlockSpec((None, None, None), lambda b, k, i, n: (b, i, n))
    q_spec = pl.BlockSpec((None, None, block_q, H), lambda b, k, i, n: (b, k, i, 0))
    kv_spec = pl.BlockSpec((None, None, chunk, None, H), lambda b, k, i, n: (b, n, 0, k, 0))
    in_specs = [q_spec, pl.BlockSpec((None, block_q), lambda b, k, i, n: (b, i)), kv_spec, kv_spec,
                pl.BlockSpec((None, None, chunk), lambda b, k, i, n: (b, n, 0))]
    args = [q_BKRH, q_pos_BR, k_BNCKH, v_BNCKH, k_pos_BNC]
    if fold_sink:
        in_specs = [range_spec, range_spec, pl.BlockSpec((None, block_q), lambda b, k, i, n: (k, i))] + in_specs
        args = [lo_BIN, hi_BIN, _row_sinks(sinks_KG, T, Rp)] + args
        out_specs = q_spec
        out_shape = jax.ShapeDtypeStruct((B, K, Rp, H), q_BTKGH.dtype)
    else:
        in_specs, args = [range_spec, range_spec] + in_specs, [lo_BIN, hi_BIN] + args
        out_specs = [pl.BlockSpec((None, None, None, block_q, H), lambda b, k, i, n: (b, k, n, i, 0)),
                     pl.BlockSpec((None, None, None, block_q), lambda b, k, i, n: (b, k, n, i))]
        out_shape = [jax.ShapeDtypeStruct((B, K, num_splits, Rp, H), _F32),
                     jax.ShapeDtypeStruct((B, K, num_splits, Rp), _F32)]
    out = pl.pallas_call(
        functools.partial(_cache_gpu_kernel, sm_scale=sm_scale, window=window, block_k=block_k,
                          fold_sink=fold_sink),
        grid=(B, K, num_q, num_splits),
        in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret, name="decode_attention_gpu" if num_q == 1 else "chunk_attention_gpu",
    )(*args)
    if fold_sink:
        return out[:, :, :T * G].reshape(B, K, T, G, H).transpose(0, 2, 1, 3, 4)
    return _merge_with_sink(*out, sinks_KG, T).astype(q_BTKGH.dtype)


# TPU (Mosaic). K/V are read as [B, K, H, S] (`_kv_tpu`): the TPU's own layout of a [B, S, K, H] array with H = 64
# puts S minor (no 64 -> 128 lane padding), so that transpose is free, where reading [B, S, K*H] made XLA copy
# (transpose) the whole cache on every call. Scores then come out of q [rows, H] @ kT [H, keys] (NN) and outputs
# out of p [rows, keys] . vT [H, keys] (NT).


def _kv_tpu(x_BSKH, Sp: int):
    """[B, K, H, Sp] K or V (padded with zeros to Sp slots: a copy, only then)."""
    return _pad_axis(x_BSKH, 1, Sp).transpose(0, 2, 3, 1)


def _kernel_key_positions(k_pos_BS, Sp: int):
    """[B, 1, Sp] slot positions for the kernels' masks, empty slots (and padding) moved to _BIG: then a key is
    visible iff 0 <= q_pos - k_pos (< window), two compares per score instead of four."""
    k_pos_BS = _pad_axis(k_pos_BS.astype(jnp.int32), 1, Sp, -1)
    return jnp.where(k_pos_BS < 0, _BIG, k_pos_BS)[:, None, :]


def _visible_fast(q_pos_R1, k_pos_1S, window: int):
    """`_visible` for key positions from `_kernel_key_positions` (query padding rows at -1 see nothing)."""
    diff = q_pos_R1 - k_pos_1S
    return (diff >= 0) & (diff < window) if window else diff >= 0


def _decode_tpu_kernel(range_ref, q_ref, q_pos_ref, k_ref, v_ref, k_pos_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc,
                       *, sm_scale, window):
    b, j = pl.program_id(0), pl.program_id(1)

    @pl.when(j == 0)
    def _():
        m_sc[...] = jnp.full(m_sc.shape, _NO_SCORE, _F32)
        l_sc[...] = jnp.zeros(l_sc.shape, _F32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, _F32)

    @pl.when((j >= range_ref[2 * b]) & (j < range_ref[2 * b + 1]))
    def _():
        s_QS = _dot(q_ref[...], k_ref[...]) * sm_scale
        s_QS = jnp.where(_visible_fast(q_pos_ref[...], k_pos_ref[...], window), s_QS, -jnp.inf)
        m_new = jnp.maximum(m_sc[...], s_QS.max(axis=-1, keepdims=True))
        alpha = jnp.exp(m_sc[...] - m_new)
        p_QS = jnp.exp(s_QS - m_new)
        l_sc[...] = alpha * l_sc[...] + p_QS.sum(axis=-1, keepdims=True)
        acc_sc[...] = alpha * acc_sc[...] + _dot_nt(p_QS.astype(v_ref.dtype), v_ref[...])
        m_sc[...] = m_new

    @pl.when(j == pl.num_programs(1) - 1)
    def _():
        o_ref[...], lse_ref[...] = _finish(m_sc[...], l_sc[...], acc_sc[...])


def _decode_tpu(q_BTKGH, k_BSKH, v_BSKH, sinks_KG, q_pos_BT, k_pos_BS, *, window, sm_scale, block_k, interpret):
    """A few query rows (T*G <= TPU_DECODE_MAX_ROWS). Grid (B, slot blocks). All K heads are done in one matmul
    against a block-diagonal query [K*rows, K*H] (row block k holds head k's rows in lanes k*H..k*H+H, zeros
    elsewhere) and K/V blocks [K*H, keys]; the diagonal blocks of the output are the answer. That is K times the
    FLOPs of a per-head kernel, which decode (memory-bound, 2*T*G flops per K/V byte and head) affords, and the
    MXU contracts all K*H = 512 lanes at once instead of 64 of 128."""
    B, T, K, G, H = q_BTKGH.shape
    S = k_BSKH.shape[1]
    rows = _round_up(T * G, 8)
    q_BKRH, q_pos_BR = _rows(q_BTKGH, q_pos_BT, rows)
    eye_KK = jnp.eye(K, dtype=q_BTKGH.dtype)
    q_BQL = jnp.einsum("bkrh,kl->bkrlh", q_BKRH, eye_KK).reshape(B, K * rows, K * H)  # Q = K*rows, L = K*H
    q_pos_BQ1 = jnp.tile(q_pos_BR, (1, K))[:, :, None]
    # One block of all the slots when they fit (a block may equal the whole axis), else 128-aligned blocks.
    block_k = S if S <= block_k else block_k
    Sp = _round_up(S, block_k)
    k_BLS, v_BLS = (_kv_tpu(x, Sp).reshape(B, K * H, Sp) for x in (k_BSKH, v_BSKH))  # free: H is a multiple of 8
    lo_B1, hi_B1 = _block_ranges(_needed_blocks(
        q_pos_BR[:, None], _pad_axis(k_pos_BS.astype(jnp.int32), 1, Sp, -1).reshape(B, Sp // block_k, block_k),
        window))
    ranges = jnp.concatenate([lo_B1, hi_B1], axis=1).reshape(2 * B)  # SMEM: flat, [lo, hi] per row
    Q, L = K * rows, K * H

    def key_block(b, j, r):
        return _clamp_block(j, r[2 * b], r[2 * b + 1])

    kv_spec = pl.BlockSpec((None, L, block_k), lambda b, j, r: (b, 0, key_block(b, j, r)))
    wide_spec, col_spec = (pl.BlockSpec((None, Q, n), lambda b, j, r: (b, 0, 0)) for n in (L, 1))
    o_BQL, lse_BQ1 = pl.pallas_call(
        functools.partial(_decode_tpu_kernel, sm_scale=sm_scale, window=window),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(B, Sp // block_k),
            in_specs=[wide_spec, col_spec, kv_spec, kv_spec,
                      pl.BlockSpec((None, 1, block_k), lambda b, j, r: (b, 0, key_block(b, j, r)))],
            out_specs=[wide_spec, col_spec],
            scratch_shapes=[pltpu.VMEM((Q, 1), _F32), pltpu.VMEM((Q, 1), _F32), pltpu.VMEM((Q, L), _F32)]),
        out_shape=[jax.ShapeDtypeStruct((B, Q, L), _F32), jax.ShapeDtypeStruct((B, Q, 1), _F32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret, name="decode_attention_tpu",
    )(ranges, q_BQL, q_pos_BQ1, k_BLS, v_BLS, _kernel_key_positions(k_pos_BS, Sp))
    o_BKRH = jnp.einsum("bkrlh,kl->bkrh", o_BQL.reshape(B, K, rows, K, H), eye_KK.astype(_F32))
    return _merge_with_sink(o_BKRH[:, :, None], lse_BQ1.reshape(B, K, 1, rows), sinks_KG, T).astype(q_BTKGH.dtype)


def _chunk_tpu_kernel(range_ref, sink_ref, q_ref, q_pos_ref, k_ref, v_ref, k_pos_ref, o_ref, m_sc, l_sc, acc_sc,
                      *, sm_scale, window, num_q_blocks):
    """One block of query rows of one kv head against one key block, online softmax in VMEM scratch."""
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    at = 2 * (b * num_q_blocks + i)

    @pl.when(j == 0)
    def _():
        # The sink is the softmax's first column: the max starts at the sink and the sum at e^(sink - sink) = 1,
        # so a row that sees no key comes out 0.
        m_sc[...] = sink_ref[...]
        l_sc[...] = jnp.ones(l_sc.shape, _F32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, _F32)

    @pl.when((j >= range_ref[at]) & (j < range_ref[at + 1]))
    def _():
        s_RS = _dot(q_ref[...], k_ref[...])
        if sm_scale != 1.0:
            s_RS = s_RS * sm_scale
        s_RS = jnp.where(_visible_fast(q_pos_ref[...], k_pos_ref[...], window), s_RS, -jnp.inf)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, s_RS.max(axis=-1, keepdims=True))
        alpha = jnp.exp(m_prev - m_new)
        p_RS = jnp.exp(s_RS - m_new)
        l_sc[...] = alpha * l_sc[...] + p_RS.sum(axis=-1, keepdims=True)
        acc_sc[...] = alpha * acc_sc[...] + _dot_nt(p_RS.astype(v_ref.dtype), v_ref[...])
        m_sc[...] = m_new

    @pl.when(j == pl.num_programs(3) - 1)
    def _():
        o_ref[...] = (acc_sc[...] / l_sc[...]).astype(o_ref.dtype)


def _chunk_tpu(q_BTKGH, k_BSKH, v_BSKH, sinks_KG, q_pos_BT, k_pos_BS, *, window, sm_scale, block_q, block_k,
               interpret):
    """Many query rows (prefill chunks). Grid (B, K, query blocks of `block_q` rows, key blocks): flash attention
    per kv head with the G query heads' rows stacked. Key blocks outside a query block's range are neither
    fetched nor computed. The sink joins in the kernel, which writes the final output."""
    B, T, K, G, H = q_BTKGH.shape
    S = k_BSKH.shape[1]
    R = T * G
    block_q = min(block_q, _round_up(R, 16))
    num_q = -(-R // block_q)
    Rp = num_q * block_q
    if _is_power_of_two(sm_scale):  # exact in any float format: fold the scale into q
        q_BTKGH, sm_scale = q_BTKGH * jnp.asarray(sm_scale, q_BTKGH.dtype), 1.0
    q_BKRH, q_pos_BR = _rows(q_BTKGH, q_pos_BT, Rp)
    # Key blocks: all the slots in one block when they are few (a block may equal the whole axis), else the
    # largest multiple of 128 up to block_k that divides the slots rounded up to 128 (a copy only then).
    if S <= 2 * block_k:
        block_k, Sp = S, S
    else:
        Sp = _round_up(S, 128)
        block_k = max(c for c in range(128, block_k + 1, 128) if Sp % c == 0)
    num_k = Sp // block_k
    lo_BI, hi_BI = _block_ranges(_needed_blocks(
        q_pos_BR.reshape(B, num_q, block_q),
        _pad_axis(k_pos_BS.astype(jnp.int32), 1, Sp, -1).reshape(B, num_k, block_k), window))
    ranges = jnp.stack([lo_BI, hi_BI], axis=-1).reshape(2 * B * num_q)  # SMEM: flat, [lo, hi] per query block

    def key_block(b, i, j, r):
        at = 2 * (b * num_q + i)
        return _clamp_block(j, r[at], r[at + 1])

    q_spec = pl.BlockSpec((None, None, block_q, H), lambda b, k, i, j, r: (b, k, i, 0))
    kv_spec = pl.BlockSpec((None, None, H, block_k), lambda b, k, i, j, r: (b, k, 0, key_block(b, i, j, r)))
    o_BKRH = pl.pallas_call(
        functools.partial(_chunk_tpu_kernel, sm_scale=sm_scale, window=window, num_q_blocks=num_q),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(B, K, num_q, num_k),
            in_specs=[pl.BlockSpec((None, block_q, 1), lambda b, k, i, j, r: (k, i, 0)), q_spec,
                      pl.BlockSpec((None, block_q, 1), lambda b, k, i, j, r: (b, i, 0)), kv_spec, kv_spec,
                      pl.BlockSpec((None, 1, block_k), lambda b, k, i, j, r: (b, 0, key_block(b, i, j, r)))],
            out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((block_q, 1), _F32), pltpu.VMEM((block_q, 1), _F32),
                            pltpu.VMEM((block_q, H), _F32)]),
        out_shape=jax.ShapeDtypeStruct((B, K, Rp, H), q_BTKGH.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret, name="chunk_attention_tpu",
    )(ranges, _row_sinks(sinks_KG, T, Rp)[:, :, None], q_BKRH, q_pos_BR[:, :, None], _kv_tpu(k_BSKH, Sp),
      _kv_tpu(v_BSKH, Sp), _kernel_key_positions(k_pos_BS, Sp))
    return o_BKRH[:, :, :R].reshape(B, K, T, G, H).transpose(0, 2, 1, 3, 4)


def _is_power_of_two(x: float) -> bool:
    return x > 0 and math.frexp(x)[0] == 0.5


def decode_attention(q_BTKGH, k_BSKH, v_BSKH, sinks_KG, *, window: int, sm_scale: float, q_pos_BT, k_pos_BS,
                     interpret: bool = False, block_k: int | None = None, num_splits: int = 4,
                     backend: str | None = None, num_warps: int = 4, num_stages: int = 2,
                     block_q: int | None = None):
    """`attention_xla` with positions: T queries per row (a decode step, or a prefill chunk of hundreds) against S
    cache slots whose positions are given (-1 = empty). Masking goes by position, never slot order, so a full
    cache (slot = position) and a ring buffer (slot = position mod window) are the same call. Forward only.

    Memory and work scale with T x S without a [T, S] score matrix: the T*G query rows of a kv head are tiled
    into blocks of `block_q` rows, each streaming the key blocks with an online softmax, and key blocks that no
    row of a query block can see (empty slots, slots after its last query, slots older than the window) are
    skipped, judged from positions.
    GPU: when all rows fit one block (T*G <= block_q, default 128: a decode step), the slots are cut into
    `num_splits` parts for parallelism instead; block_k default 64 (powers of two >= 16).
    TPU: up to TPU_DECODE_MAX_ROWS rows one kernel instance per row does all kv heads together (block_k default
    512); more rows take the chunk kernel (block_q default 512 rows, block_k default 512: multiples of 128, or all
    the slots when they fit in one block). S is padded (a copy) unless it fills whole blocks (TPU chunk kernel:
    a multiple of 128).
    """
    B, T, K, G, H = q_BTKGH.shape
    S = k_BSKH.shape[1]
    if k_BSKH.shape != (B, S, K, H) or v_BSKH.shape != k_BSKH.shape or sinks_KG.shape != (K, G) \
            or q_pos_BT.shape != (B, T) or k_pos_BS.shape != (B, S):
        raise ValueError(f"decode_attention wants q [B, T, K, G, H], k and v [B, S, K, H], sinks [K, G], q_pos "
                         f"[B, T], k_pos [B, S]; got {q_BTKGH.shape}, {k_BSKH.shape}, {v_BSKH.shape}, "
                         f"{sinks_KG.shape}, {q_pos_BT.shape}, {k_pos_BS.shape}")
    backend = _backend(backend)
    kw = dict(window=window, sm_scale=sm_scale, interpret=interpret)
    args = (q_BTKGH, k_BSKH, v_BSKH, sinks_KG, q_pos_BT, k_pos_BS)
    if backend == "tpu" and T * G <= TPU_DECODE_MAX_ROWS:
        with jax.named_scope(f"decode_attention_tpu_w{window}"):
            return _decode_tpu(*args, block_k=block_k or 512, **kw)
    if backend == "tpu":
        with jax.named_scope(f"chunk_attention_tpu_w{window}"):
            return _chunk_tpu(*args, block_q=block_q or 512, block_k=block_k or 512, **kw)
    with jax.named_scope(f"decode_attention_gpu_w{window}"):
        return _cache_gpu(*args, block_q=block_q or 128, block_k=block_k or 64, num_splits=num_splits,
                          num_warps=num_warps, num_stages=num_stages, **kw)
