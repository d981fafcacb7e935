"""Pallas kernels for causal attention with sinks and a sliding window; the twin is `attention.attention_xla`.

- `flash_attention`: a whole sequence (positions 0..T-1), forward and backward (gradients for q, k, v and the
  sinks). TPU: JAX's splash attention (sinks built in, `LocalMask` for the window), one MQA kernel per kv head.
  GPU: Triton kernels written here. Both skip key blocks outside the band, so a sliding layer costs O(T x window).
- `decode_attention`: a few queries per row against KV-cache slots that carry their own positions (-1 = empty), so
  a ring buffer (slot = position mod window) needs nothing special. Forward only.

Shapes: B batch, T queries, S keys, K kv heads, G query heads per kv head, H head dim, R = T*G query rows of one kv
head (row r is query r // G of head g = r % G). Query head k*G + g reads kv head k; K/V are never repeated.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
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


def _fwd_kernel(sink_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, cfg: _GpuCfg):
    i = pl.program_id(2)
    bq, bk = cfg.block_q, cfg.block_k
    q_RH = q_ref[...]
    q_pos = i * bq + jnp.arange(bq)

    def body(j, carry):
        m_R, l_R, acc_RH = carry
        keys = pl.ds(pl.multiple_of(j * bk, bk), bk)
        s_RS = _dot_nt(q_RH, k_ref[keys, :]) * cfg.sm_scale
        s_RS = jnp.where(_visible(q_pos[:, None], (j * bk + jnp.arange(bk))[None, :], cfg.window), s_RS, -jnp.inf)
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


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, cfg: _GpuCfg):
    i = pl.program_id(2)
    bq, bk = cfg.block_q, cfg.block_k
    q_RH, do_RH, lse_R, delta_R = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    q_pos = i * bq + jnp.arange(bq)

    def body(j, dq_RH):
        keys = pl.ds(pl.multiple_of(j * bk, bk), bk)
        k_SH, v_SH = k_ref[keys, :], v_ref[keys, :]
        s_RS = _dot_nt(q_RH, k_SH) * cfg.sm_scale
        s_RS = jnp.where(_visible(q_pos[:, None], (j * bk + jnp.arange(bk))[None, :], cfg.window), s_RS, -jnp.inf)
        p_RS = jnp.exp(s_RS - lse_R[:, None])
        ds_RS = p_RS * (_dot_nt(do_RH, v_SH) - delta_R[:, None])
        return dq_RH + _dot(ds_RS.astype(k_SH.dtype), k_SH)

    dq_RH = lax.fori_loop(*_key_blocks(i, cfg), body, jnp.zeros(q_RH.shape, _F32))
    dq_ref[...] = (dq_RH * cfg.sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, cfg: _GpuCfg):
    """One key block of one kv head, summed over its G query heads: dK/dV come out per kv head directly."""
    j = pl.program_id(2)
    bq, bk = cfg.block_q, cfg.block_k
    G, num_q_blocks = q_ref.shape[1], q_ref.shape[0] // bq
    k_SH, v_SH = k_ref[...], v_ref[...]
    k_pos = j * bk + jnp.arange(bk)
    lo, hi = _query_blocks(j, num_q_blocks, cfg)
    n = hi - lo

    def body(step, carry):  # step runs over (query head g, query block i)
        dk_SH, dv_SH = carry
        g, i = step // n, lo + step % n
        rows = pl.ds(pl.multiple_of(i * bq, bq), bq)
        q_RH, do_RH = q_ref[rows, g, :], do_ref[rows, g, :]
        lse_R, delta_R = lse_ref[g, rows], delta_ref[g, rows]
        s_RS = _dot_nt(q_RH, k_SH) * cfg.sm_scale
        s_RS = jnp.where(_visible((i * bq + jnp.arange(bq))[:, None], k_pos[None, :], cfg.window), s_RS, -jnp.inf)
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


def _flash_gpu_fwd_call(q_BTKGH, k_BTKH, v_BTKH, sinks_KG, cfg: _GpuCfg):
    B, T, K, G, H = q_BTKGH.shape
    bq = cfg.block_q
    q_spec = pl.BlockSpec((None, bq, None, None, H), lambda b, h, i: (b, i, h // G, h % G, 0))
    kv_spec = pl.BlockSpec((None, T, None, H), lambda b, h, i: (b, 0, h // G, 0))
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg),
        grid=(B, K * G, T // bq),
        in_specs=[pl.BlockSpec((None, None), lambda b, h, i: (h // G, h % G)), q_spec, kv_spec, kv_spec],
        out_specs=[q_spec, pl.BlockSpec((None, None, None, bq), lambda b, h, i: (b, h // G, h % G, i))],
        out_shape=[jax.ShapeDtypeStruct(q_BTKGH.shape, q_BTKGH.dtype), jax.ShapeDtypeStruct((B, K, G, T), _F32)],
        compiler_params=_triton_params(cfg), interpret=cfg.interpret, name="flash_attention_sinks_fwd",
    )(sinks_KG, q_BTKGH, k_BTKH, v_BTKH)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash_gpu(q_BTKGH, k_BTKH, v_BTKH, sinks_KG, cfg: _GpuCfg):
    return _flash_gpu_fwd_call(q_BTKGH, k_BTKH, v_BTKH, sinks_KG, cfg)[0]


def _flash_gpu_fwd(q_BTKGH, k_BTKH, v_BTKH, sinks_KG, cfg: _GpuCfg):
    o_BTKGH, lse_BKGT = _flash_gpu_fwd_call(q_BTKGH, k_BTKH, v_BTKH, sinks_KG, cfg)
    return o_BTKGH, (q_BTKGH, k_BTKH, v_BTKH, sinks_KG, o_BTKGH, lse_BKGT)


def _flash_gpu_bwd(cfg: _GpuCfg, res, do_BTKGH):
    q_BTKGH, k_BTKH, v_BTKH, sinks_KG, o_BTKGH, lse_BKGT = res
    B, T, K, G, H = q_BTKGH.shape
    bq, bk = cfg.block_q, cfg.block_k
    # delta = dO . O per row: the softmax backward's row term (O includes the sink's share of the mass).
    delta_BKGT = jnp.einsum("btkgh,btkgh->bkgt", do_BTKGH.astype(_F32), o_BTKGH.astype(_F32))
    # The sink is a logit whose value vector is 0: d sink = -sum over rows of p_sink * delta.
    p_sink_BKGT = jnp.exp(sinks_KG.astype(_F32)[None, :, :, None] - lse_BKGT)
    dsinks_KG = -(p_sink_BKGT * delta_BKGT).sum(axis=(0, 3)).astype(sinks_KG.dtype)

    q_spec = pl.BlockSpec((None, bq, None, None, H), lambda b, h, i: (b, i, h // G, h % G, 0))
    kv_spec = pl.BlockSpec((None, T, None, H), lambda b, h, i: (b, 0, h // G, 0))
    row_spec = pl.BlockSpec((None, None, None, bq), lambda b, h, i: (b, h // G, h % G, i))
    dq_BTKGH = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid=(B, K * G, T // bq),
        in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q_BTKGH.shape, q_BTKGH.dtype),
        compiler_params=_triton_params(cfg), interpret=cfg.interpret, name="flash_attention_sinks_dq",
    )(q_BTKGH, k_BTKH, v_BTKH, do_BTKGH, lse_BKGT, delta_BKGT)

    qs_spec = pl.BlockSpec((None, T, None, G, H), lambda b, k, j: (b, 0, k, 0, 0))  # all G heads of kv head k
    kb_spec = pl.BlockSpec((None, bk, None, H), lambda b, k, j: (b, j, k, 0))
    rows_spec = pl.BlockSpec((None, None, G, T), lambda b, k, j: (b, k, 0, 0))
    dk_BTKH, dv_BTKH = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg),
        grid=(B, K, T // bk),
        in_specs=[qs_spec, kb_spec, kb_spec, qs_spec, rows_spec, rows_spec],
        out_specs=[kb_spec, kb_spec],
        out_shape=[jax.ShapeDtypeStruct(k_BTKH.shape, k_BTKH.dtype), jax.ShapeDtypeStruct(v_BTKH.shape, v_BTKH.dtype)],
        compiler_params=_triton_params(cfg), interpret=cfg.interpret, name="flash_attention_sinks_dkv",
    )(q_BTKGH, k_BTKH, v_BTKH, do_BTKGH, lse_BKGT, delta_BKGT)
    return dq_BTKGH, dk_BTKH, dv_BTKH, dsinks_KG


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
    `segment_ids_BT` (packed training rows) is supported on TPU only (splash's SegmentIds); `ops.attention`
    sends such calls to the twin on GPU.
    """
    B, T, K, G, H = q_BTKGH.shape
    if k_BSKH.shape != (B, T, K, H) or v_BSKH.shape != k_BSKH.shape or sinks_KG.shape != (K, G):
        raise ValueError(f"flash_attention wants q [B, T, K, G, H], k and v [B, T, K, H], sinks [K, G]; got "
                         f"{q_BTKGH.shape}, {k_BSKH.shape}, {v_BSKH.shape}, {sinks_KG.shape}")
    backend = _backend(backend)
    if segment_ids_BT is not None and backend != "tpu":
        raise NotImplementedError("flash_attention: segment ids are supported on TPU only (use attention_xla)")
    default_block = 128 if backend == "tpu" else 64
    block_q, block_k = block_q or default_block, block_k or default_block
    Tp = _round_up(T, max(block_q, block_k))
    q, k, v = (_pad_axis(x, 1, Tp) for x in (q_BTKGH, k_BSKH, v_BSKH))
    with jax.named_scope(f"flash_attention_{backend}_w{window}"):
        if backend == "tpu":
            # Padded keys get their own segment, so no real query sees them in either direction.
            seg = None if segment_ids_BT is None else _pad_axis(segment_ids_BT.astype(jnp.int32), 1, Tp, value=-1)
            out = _flash_tpu(q, k, v, sinks_KG, seg, window=window, sm_scale=sm_scale, block_q=block_q,
                             block_k=block_k, interpret=interpret)
        else:
            cfg = _GpuCfg(window, float(sm_scale), block_q, block_k, num_warps, num_stages, interpret)
            out = _flash_gpu(q, k, v, sinks_KG, cfg)
    return out[:, :T]


# ---------------------------------------------------------------------------------------------------------------
# Decode attention over KV-cache slots. Kernels return each row's sink-free (o, lse) over its slots; the sink
# joins in `_merge_with_sink`, which also combines GPU splits.


def _rows(q_BTKGH, q_pos_BT, rows: int):
    """[B, K, rows, H] query rows of each kv head (row r = t*G + g) and their positions [B, rows]; padding rows
    get position -1 and so see nothing."""
    B, T, K, G, H = q_BTKGH.shape
    q_BKRH = _pad_axis(q_BTKGH.transpose(0, 2, 1, 3, 4).reshape(B, K, T * G, H), 2, rows)
    return q_BKRH, _pad_axis(jnp.repeat(q_pos_BT.astype(jnp.int32), G, axis=1), 1, rows, -1)


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


def _decode_gpu_kernel(q_ref, q_pos_ref, k_ref, v_ref, k_pos_ref, o_ref, lse_ref, *, sm_scale, window, block_k):
    q_RH = q_ref[...]
    q_pos_R1 = q_pos_ref[...][:, None]

    def body(j, carry):
        keys = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
        s_RS = _dot_nt(q_RH, k_ref[keys, :]) * sm_scale
        s_RS = jnp.where(_visible(q_pos_R1, k_pos_ref[keys][None, :], window), s_RS, -jnp.inf)
        return _online_softmax_step(*carry, s_RS, v_ref[keys, :])

    R, H = q_RH.shape
    init = (jnp.full((R, 1), _NO_SCORE, _F32), jnp.zeros((R, 1), _F32), jnp.zeros((R, H), _F32))
    o_RH, lse_R1 = _finish(*lax.fori_loop(0, k_ref.shape[0] // block_k, body, init))
    o_ref[...] = o_RH
    lse_ref[...] = lse_R1[:, 0]


def _decode_gpu(q_BTKGH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS, *, window, sm_scale, block_k, num_splits, interpret,
                num_warps, num_stages):
    """Grid (B, K, splits): each split of the slots gives a partial (o, lse), merged in XLA (flash-decoding)."""
    B, T, K, G, H = q_BTKGH.shape
    S = k_BSKH.shape[1]
    rows = max(16, pl.next_power_of_2(T * G))  # Triton dots need >= 16 rows
    q_BKRH, q_pos_BR = _rows(q_BTKGH, q_pos_BT, rows)
    # No more splits than whole key blocks: a 128-slot ring in 4 splits of 64 would be padded (copied) to 256.
    num_splits = max(1, min(num_splits, S // block_k))
    chunk = _round_up(-(-S // num_splits), block_k)
    Sp = chunk * num_splits
    # Reshapes, free when S already fills the splits; empty padding slots have position -1.
    k_BNCKH, v_BNCKH = (_pad_axis(x, 1, Sp).reshape(B, num_splits, chunk, K, H) for x in (k_BSKH, v_BSKH))
    k_pos_BNC = _pad_axis(k_pos_BS.astype(jnp.int32), 1, Sp, -1).reshape(B, num_splits, chunk)
    kv_spec = pl.BlockSpec((None, None, chunk, None, H), lambda b, k, n: (b, n, 0, k, 0))
    o_BKNRH, lse_BKNR = pl.pallas_call(
        functools.partial(_decode_gpu_kernel, sm_scale=sm_scale, window=window, block_k=block_k),
        grid=(B, K, num_splits),
        in_specs=[pl.BlockSpec((None, None, rows, H), lambda b, k, n: (b, k, 0, 0)),
                  pl.BlockSpec((None, rows), lambda b, k, n: (b, 0)), kv_spec, kv_spec,
                  pl.BlockSpec((None, None, chunk), lambda b, k, n: (b, n, 0))],
        out_specs=[pl.BlockSpec((None, None, None, rows, H), lambda b, k, n: (b, k, n, 0, 0)),
                   pl.BlockSpec((None, None, None, rows), lambda b, k, n: (b, k, n, 0))],
        out_shape=[jax.ShapeDtypeStruct((B, K, num_splits, rows, H), _F32),
                   jax.ShapeDtypeStruct((B, K, num_splits, rows), _F32)],
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret, name="decode_attention_gpu",
    )(q_BKRH, q_pos_BR, k_BNCKH, v_BNCKH, k_pos_BNC)
    return o_BKNRH, lse_BKNR


def _decode_tpu_kernel(q_ref, q_pos_ref, k_ref, v_ref, k_pos_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc, *, sm_scale,
                       window):
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _():
        m_sc[...] = jnp.full(m_sc.shape, _NO_SCORE, _F32)
        l_sc[...] = jnp.zeros(l_sc.shape, _F32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, _F32)

    s_RS = _dot_nt(q_ref[...], k_ref[...]) * sm_scale
    s_RS = jnp.where(_visible(q_pos_ref[...], k_pos_ref[...], window), s_RS, -jnp.inf)
    m_sc[...], l_sc[...], acc_sc[...] = _online_softmax_step(m_sc[...], l_sc[...], acc_sc[...], s_RS, v_ref[...])

    @pl.when(j == pl.num_programs(1) - 1)
    def _():
        o_ref[...], lse_ref[...] = _finish(m_sc[...], l_sc[...], acc_sc[...])


def _decode_tpu(q_BTKGH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS, *, window, sm_scale, block_k, interpret):
    """Grid (B, slot blocks). K/V are read in the cache's own layout as [B, S, K*H] (a free reshape): Mosaic
    cannot block a single kv head out of [.., K, H] (its last two block dims must be whole or (8, 128)-aligned),
    so all K heads are done in one matmul against a block-diagonal query [K*rows, K*H] (row block k holds head
    k's rows in lanes k*H..k*H+H, zeros elsewhere); the diagonal blocks of the output are the answer. That is K
    times the FLOPs of a per-head kernel, which decode (memory-bound, 2*T*G flops per K/V byte and head) affords."""
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
    k_BSL, v_BSL = (_pad_axis(x, 1, Sp).reshape(B, Sp, K * H) for x in (k_BSKH, v_BSKH))
    k_pos_B1S = _pad_axis(k_pos_BS.astype(jnp.int32), 1, Sp, -1)[:, None, :]
    Q, L = K * rows, K * H
    kv_spec = pl.BlockSpec((None, block_k, L), lambda b, j: (b, j, 0))
    wide_spec, col_spec = (pl.BlockSpec((None, Q, n), lambda b, j: (b, 0, 0)) for n in (L, 1))
    o_BQL, lse_BQ1 = pl.pallas_call(
        functools.partial(_decode_tpu_kernel, sm_scale=sm_scale, window=window),
        grid=(B, Sp // block_k),
        in_specs=[wide_spec, col_spec, kv_spec, kv_spec, pl.BlockSpec((None, 1, block_k), lambda b, j: (b, 0, j))],
        out_specs=[wide_spec, col_spec],
        out_shape=[jax.ShapeDtypeStruct((B, Q, L), _F32), jax.ShapeDtypeStruct((B, Q, 1), _F32)],
        scratch_shapes=[pltpu.VMEM((Q, 1), _F32), pltpu.VMEM((Q, 1), _F32), pltpu.VMEM((Q, L), _F32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret, name="decode_attention_tpu",
    )(q_BQL, q_pos_BQ1, k_BSL, v_BSL, k_pos_B1S)
    o_BKRH = jnp.einsum("bkrlh,kl->bkrh", o_BQL.reshape(B, K, rows, K, H), eye_KK.astype(_F32))
    return o_BKRH[:, :, None], lse_BQ1.reshape(B, K, 1, rows)


def decode_attention(q_BTKGH, k_BSKH, v_BSKH, sinks_KG, *, window: int, sm_scale: float, q_pos_BT, k_pos_BS,
                     interpret: bool = False, block_k: int | None = None, num_splits: int = 4,
                     backend: str | None = None, num_warps: int = 4, num_stages: int = 2):
    """`attention_xla` with positions: T queries per row (decode: 1, or a short chunk) against S cache slots whose
    positions are given (-1 = empty). Masking goes by position, never slot order, so a full cache (slot =
    position) and a ring buffer (slot = position mod window) are the same call. Forward only.

    All T*G query rows of a kv head are done together, so T*G should stay small (a decode step, not a prefill).
    GPU: the slots are cut into `num_splits` parts for parallelism (block_k default 64, a power of two >= 16).
    TPU: blocks of block_k slots (default 512; a multiple of 128 unless all the slots fit in one block) stream
    through one kernel instance per row. S is padded (a copy) unless it fills whole blocks.
    """
    B, T, K, G, H = q_BTKGH.shape
    S = k_BSKH.shape[1]
    if k_BSKH.shape != (B, S, K, H) or v_BSKH.shape != k_BSKH.shape or sinks_KG.shape != (K, G) \
            or q_pos_BT.shape != (B, T) or k_pos_BS.shape != (B, S):
        raise ValueError(f"decode_attention wants q [B, T, K, G, H], k and v [B, S, K, H], sinks [K, G], q_pos "
                         f"[B, T], k_pos [B, S]; got {q_BTKGH.shape}, {k_BSKH.shape}, {v_BSKH.shape}, "
                         f"{sinks_KG.shape}, {q_pos_BT.shape}, {k_pos_BS.shape}")
    backend = _backend(backend)
    with jax.named_scope(f"decode_attention_{backend}_w{window}"):
        if backend == "tpu":
            parts = _decode_tpu(q_BTKGH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS, window=window, sm_scale=sm_scale,
                                block_k=block_k or 512, interpret=interpret)
        else:
            parts = _decode_gpu(q_BTKGH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS, window=window, sm_scale=sm_scale,
                                block_k=block_k or 64, num_splits=num_splits, interpret=interpret,
                                num_warps=num_warps, num_stages=num_stages)
        return _merge_with_sink(*parts, sinks_KG, T).astype(q_BTKGH.dtype)
