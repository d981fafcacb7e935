"""Grouped matmul for the MoE experts as Pallas kernels (TPU: Mosaic, GPU: Triton); the twins in `moe.py` are
the specification and share these signatures.

Work is split as in megablox: rows are expert-sorted, cut into `tm`-row tiles, and each (row tile, expert) pair
that owns rows is one work item (at most tiles + E - 1 of them). The items are computed from `group_sizes_E`
outside the kernel (`work_items`) and read inside it: through scalar prefetch on TPU (the weight BlockSpecs pick
the item's expert), from a small int32 array on GPU. Every item writes only its rows of its tile, so the rows of
a tile shared by two experts, and the rows past the groups (zeros), are written exactly once.

MXFP4 experts stay packed in HBM: uint8 codes [E, N, K/2] and E8M0 scales [E, N, K/32], decoded tile by tile in
the kernel. A code byte holds elements 2j (low nibble) and 2j + 1 (high nibble), so the decoded low nibbles of
a row are its even columns and the high nibbles its odd ones; the kernel multiplies them against x[:, 0::2] and
x[:, 1::2] (split once outside, cheap next to the weights) and never interleaves weights in registers.

The fused SwiGLU epilogue (the first expert matmul) computes the gate rows (n even) and the linear rows (n odd)
of a weight tile as two products, so the activation [M, N/2] leaves the kernel directly.

Gradients (`jax.custom_vjp`): dx through a transposed kernel over the same packed weights (dx = dy @ W[e]),
dbias as segment sums, and for dense weights dW with `jax.lax.ragged_dot_general`; packed weights are frozen
(float0). Backward products take their operands in x's dtype (bf16 for bf16 models), accumulating in float32.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from gptoss_kernels.moe import expert_of_rows, expert_tiles, swiglu, swiglu_parts
from gptoss_kernels.mxfp4 import Packed

# Default tiles (rows, output columns, contraction). TPU: K is never tiled (the scales' K/32 lanes must be whole
# blocks); the output lanes of a tile must be a multiple of 128. GPU (Triton): every tile side a power of two.
_TILES = {"tpu": (128, 256, None), "gpu": (64, 128, 64)}


class _Config(NamedTuple):
    backend: str
    interpret: bool
    tile_m: int
    tile_n: int
    tile_k: int | None
    swiglu: tuple[float, float] | None  # (alpha, limit) for the fused epilogue


def _config(backend, interpret, tile_m, tile_n, tile_k, swiglu_args=None) -> _Config:
    backend = backend or jax.default_backend()
    if backend not in _TILES:
        raise ValueError(f"the MoE kernel targets 'tpu' or 'gpu', got backend={backend!r} "
                         "(on CPU pass backend='tpu' or 'gpu' with interpret=True)")
    dm, dn, dk = _TILES[backend]
    return _Config(backend, interpret, tile_m, tile_n or dn, tile_k or dk, swiglu_args)


def work_items(group_sizes_E, num_tiles: int, tm: int) -> jax.Array:
    """int32 [5, num_tiles + E - 1]: per work item its row tile, expert, rows [lo, hi) it writes, and `end`.

    Real items (one per row tile an expert's rows touch, in expert then tile order) write their expert's rows of
    the tile with values below `end` (the expert's last row + 1), zeros from there on: the last real item writes to
    the end of its tile, so the rows past the groups in that tile get zeros. The padding items after them cover
    the remaining tiles, one each, with end = 0 (zeros); surplus ones write nothing (lo = hi). Tiles never
    decrease along the items, so on TPU a shared output tile is revisited only by consecutive items, and padding
    items keep the last real expert, so its weights are not fetched again.
    """
    E = group_sizes_E.shape[0]
    starts_E, ends_E, first_tile_E, tiles_E, item_ends_E = expert_tiles(group_sizes_E, tm)
    num_real = item_ends_E[-1]

    i = jnp.arange(num_tiles + E - 1, dtype=jnp.int32)
    e_real = jnp.minimum(jnp.searchsorted(item_ends_E, i, side="right"), E - 1).astype(jnp.int32)
    real = i < num_real
    tile_real = first_tile_E[e_real] + i - (item_ends_E - tiles_E)[e_real]
    pad_tile = -(-ends_E[-1] // tm) + i - num_real  # past the tiles the groups cover
    tile = jnp.where(real, tile_real, jnp.minimum(pad_tile, num_tiles - 1))
    expert = jnp.where(real, e_real, e_real[jnp.maximum(num_real - 1, 0)])
    row0 = tile * tm
    lo = jnp.where(real, jnp.maximum(starts_E[e_real], row0), row0)
    hi_real = jnp.where(i == num_real - 1, row0 + tm, jnp.minimum(ends_E[e_real], row0 + tm))
    hi = jnp.where(real, hi_real, jnp.where(pad_tile < num_tiles, row0 + tm, row0))
    end = jnp.where(real, ends_E[e_real], 0)
    return jnp.stack([tile, expert, lo, hi, end]).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------------------------
# In-kernel MXFP4 decode (integer and select ops only: no table gather, which neither Mosaic nor Triton lowers).
# ---------------------------------------------------------------------------------------------------------------


def _fp4_value(c_i32) -> jax.Array:
    """FP4 (E2M1) codes 0..15 -> float32 values (code 8 is -0, as in FP4_VALUES)."""
    e = (c_i32 >> 1) & 3
    m = (c_i32 & 1).astype(jnp.float32)
    mag = jnp.where(e == 0, 0.5 * m, (1.0 + 0.5 * m) * jnp.where(e == 1, 1.0, jnp.where(e == 2, 2.0, 4.0)))
    return jnp.where(c_i32 >= 8, -mag, mag)


def _expand_scales_matmul(scale_RG, B: int) -> jax.Array:
    """[R, G] -> [R, B] with each scale repeated B/G times, as a product with a 0/1 matrix: Mosaic has no lane
    repeat, and a product of powers of two by 0/1 (one term a sum) is exact, in bf16 operands too."""
    G = scale_RG.shape[1]
    # 16 bytes a scale group; a shift, as integer division lowers through `sign`, which Mosaic lowers only
    # knowing the TPU generation (unknown when exporting from a CPU host).
    g_of_b = jax.lax.broadcasted_iota(jnp.int32, (G, B), 1) >> 4
    expand_GB = (g_of_b == jax.lax.broadcasted_iota(jnp.int32, (G, B), 0)).astype(jnp.bfloat16)
    return jnp.dot(scale_RG.astype(jnp.bfloat16), expand_GB, preferred_element_type=jnp.float32)


def _expand_scales_reshape(scale_RG, B: int) -> jax.Array:
    R, G = scale_RG.shape
    return jnp.broadcast_to(scale_RG[:, :, None], (R, G, B // G)).reshape(R, B)


def _decode(codes_RB, scales_RG, expand) -> tuple[jax.Array, jax.Array]:
    """Packed codes [R, B] (uint8) and scales [R, B/16] -> the even and the odd columns, float32 [R, B] each.
    Exact for scale bytes 1..254 (byte 0, 2^-127, decodes to 0; 255 is NaN in E8M0)."""
    c = codes_RB.astype(jnp.int32)
    scale = jax.lax.bitcast_convert_type(scales_RG.astype(jnp.int32) << 23, jnp.float32)  # 2^(s - 127)
    scale = expand(scale, c.shape[1])
    return _fp4_value(c & 0xF) * scale, _fp4_value(c >> 4) * scale


def _precision(dtype):
    # float32 operands: full-precision products (the default would be bf16 passes on TPU, tf32 on GPU).
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _dot_nt(a, b, dtype):
    """a [m, k] @ b [n, k].T in float32."""
    return jax.lax.dot_general(a.astype(dtype), b.astype(dtype), (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32, precision=_precision(dtype))


def _dot_nn(a, b, dtype):
    """a [m, k] @ b [k, n] in float32."""
    return jax.lax.dot_general(a.astype(dtype), b.astype(dtype), (((1,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32, precision=_precision(dtype))


def _epilogue(accs, cfg: _Config):
    return accs[0] if cfg.swiglu is None else swiglu_parts(accs[0], accs[1], *cfg.swiglu)


# ---------------------------------------------------------------------------------------------------------------
# TPU (Mosaic). Grid (N tiles, items) forward, (items, N tiles) for dx; K whole in every block.
# ---------------------------------------------------------------------------------------------------------------


def _tpu_tile_n(tile_n: int, N: int, parts: int) -> int:
    """Whole N, or a multiple of 128 lanes per part (a last partial tile is clipped by Pallas)."""
    if N <= tile_n:
        return N
    if tile_n % (128 * parts):
        raise ValueError(f"TPU tile_n={tile_n} must be a multiple of {128 * parts} (or >= N={N})")
    return tile_n


def _forward_tpu(meta, xs, ws, bias_P1E1n, *, tm, cfg: _Config, dtype):
    H, P = len(xs), bias_P1E1n.shape[0]
    Mp, Kh = xs[0].shape
    N = ws[0].shape[1]
    tn = _tpu_tile_n(cfg.tile_n, N, P)
    packed = len(ws) == 2

    def kernel(meta_ref, *refs):
        x_refs, w_refs = refs[:H], refs[H:H + len(ws)]
        b_ref, o_ref, cache_ref, *tmp_ref = refs[H + len(ws):]
        i = pl.program_id(1)
        tile, e, lo, hi, end = (meta_ref[f, i] for f in range(5))

        # Decode the expert's [tn, K] tile into VMEM only when the expert changes: consecutive items of one
        # expert (its row tiles) reuse it, so prefill decodes each weight once per N tile.
        @pl.when((i == 0) | (e != meta_ref[1, jnp.maximum(i - 1, 0)]))
        def _decode_tile():
            if packed:
                halves = _decode(w_refs[0][...], w_refs[1][...], _expand_scales_matmul)
            else:
                halves = (w_refs[0][...],)
            for h, w_h in enumerate(halves):
                if P == 1:
                    cache_ref[h, 0] = w_h.astype(cache_ref.dtype)
                else:  # gate rows n even, linear rows n odd: strided sublane loads from float32
                    tmp_ref[0][...] = w_h.astype(jnp.float32)
                    for p in range(P):
                        cache_ref[h, p] = tmp_ref[0][pl.ds(p, tn // P, stride=P), :].astype(cache_ref.dtype)

        rows = tile * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
        write = (rows >= lo) & (rows < hi)

        @pl.when(end > lo)
        def _compute():
            accs = [sum(_dot_nt(x_refs[h][...], cache_ref[h, p], dtype) for h in range(H)) + b_ref[p]
                    for p in range(P)]
            o_ref[...] = jnp.where(write, jnp.where(rows < end, _epilogue(accs, cfg), 0.0), o_ref[...])

        @pl.when(end <= lo)
        def _padding():
            o_ref[...] = jnp.where(write, 0.0, o_ref[...])

    x_spec = pl.BlockSpec((tm, Kh), lambda j, i, meta: (meta[0, i], 0))
    w_specs = [pl.BlockSpec((None, tn, a.shape[2]), lambda j, i, meta: (meta[1, i], j, 0)) for a in ws]
    b_spec = pl.BlockSpec((P, None, 1, tn // P), lambda j, i, meta: (0, meta[1, i], 0, j))
    scratch = [pltpu.VMEM((H, P, tn // P, Kh), dtype)] + ([pltpu.VMEM((tn, Kh), jnp.float32)] if P > 1 else [])
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((Mp, N // P), jnp.float32),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(pl.cdiv(N, tn), meta.shape[1]),
            in_specs=[x_spec] * H + w_specs + [b_spec],
            out_specs=pl.BlockSpec((tm, tn // P), lambda j, i, meta: (meta[0, i], j)),
            scratch_shapes=scratch),
        # Items revisit output tiles and reuse the decode cache: sequential; N tiles split across cores.
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=cfg.interpret,
        name="moe_gmm_swiglu" if P > 1 else "moe_gmm",
    )(meta, *xs, *ws, bias_P1E1n)


def _backward_x_tpu(meta, g_MpN, ws, *, tm, K, cfg: _Config, dtype):
    """dx halves [Mp, K/H] float32: dx[m] = dy[m] @ W[e(m)], reducing over N tiles (the last grid axis)."""
    packed = len(ws) == 2
    H = 2 if packed else 1
    Mp, N = g_MpN.shape
    Kh = K // H
    tn = _tpu_tile_n(cfg.tile_n, N, 1)
    num_n = pl.cdiv(N, tn)

    def kernel(meta_ref, g_ref, *refs):
        w_refs, o_refs, acc_ref = refs[:len(ws)], refs[len(ws):len(ws) + H], refs[-1]
        i, j = pl.program_id(0), pl.program_id(1)
        tile, e, lo, hi, end = (meta_ref[f, i] for f in range(5))

        @pl.when(j == 0)
        def _zero():
            acc_ref[...] = jnp.zeros_like(acc_ref)

        @pl.when(end > lo)
        def _accumulate():
            if packed:
                halves = _decode(w_refs[0][...], w_refs[1][...], _expand_scales_matmul)
            else:
                halves = (w_refs[0][...],)
            g = g_ref[...]
            if N % tn:  # the clipped last tile holds garbage past N, in both operands: zero it (0 * NaN = NaN)
                g = jnp.where(jax.lax.broadcasted_iota(jnp.int32, g.shape, 1) < N - j * tn, g, 0)
                valid_n = jax.lax.broadcasted_iota(jnp.int32, (tn, 1), 0) < N - j * tn
                halves = [jnp.where(valid_n, w_h, 0) for w_h in halves]
            for h in range(H):
                acc_ref[h] += _dot_nn(g, halves[h], dtype)

        @pl.when(j == num_n - 1)
        def _store():
            rows = tile * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
            write = (rows >= lo) & (rows < hi)
            for h in range(H):
                o_refs[h][...] = jnp.where(write, jnp.where(rows < end, acc_ref[h], 0.0), o_refs[h][...])

    w_specs = [pl.BlockSpec((None, tn, a.shape[2]), lambda i, j, meta: (meta[1, i], j, 0)) for a in ws]
    out_spec = pl.BlockSpec((tm, Kh), lambda i, j, meta: (meta[0, i], 0))
    return pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct((Mp, Kh), jnp.float32)] * H,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(meta.shape[1], num_n),
            in_specs=[pl.BlockSpec((tm, tn), lambda i, j, meta: (meta[0, i], j))] + w_specs,
            out_specs=[out_spec] * H,
            scratch_shapes=[pltpu.VMEM((H, tm, Kh), jnp.float32)]),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary", "arbitrary")),
        interpret=cfg.interpret,
        name="moe_gmm_dx",
    )(meta, g_MpN, *ws)


# ---------------------------------------------------------------------------------------------------------------
# GPU (Triton). Whole arrays in global memory, tiles loaded by index: Triton has no scalar prefetch, so the
# expert of an item is read inside the kernel. Grid (N tiles, items) forward, (items, K tiles) for dx; the
# contraction is a loop, skipped (zero trips) by padding items. Items run in parallel: their row sets are
# disjoint, so masked stores never race.
# ---------------------------------------------------------------------------------------------------------------


def _pow2_divisor(n: int, cap: int, least: int, what: str) -> int:
    t = 1
    while t * 2 <= cap and n % (t * 2) == 0:
        t *= 2
    if t < least:
        raise ValueError(f"Triton needs a power-of-two {what} tile >= {least} dividing {n} (cap {cap})")
    return t


def _weight_tile_gpu(w_refs, e, rows, k0, tk):
    """The expert's rows (a pl.ds) x contraction columns [k0, k0 + tk) as float32 halves [r, tk/H]."""
    if len(w_refs) == 2:
        codes = w_refs[0][e, rows, pl.ds(k0 // 2, tk // 2)]
        scales = w_refs[1][e, rows, pl.ds(k0 // 32, tk // 32)]
        return _decode(codes, scales, _expand_scales_reshape)
    return (w_refs[0][e, rows, pl.ds(k0, tk)].astype(jnp.float32),)


def _forward_gpu(meta, xs, ws, bias_P1E1n, *, tm, cfg: _Config, dtype):
    H, P = len(xs), bias_P1E1n.shape[0]
    Mp, Kh = xs[0].shape
    K = Kh * H
    N = ws[0].shape[1]
    tn = _pow2_divisor(N, cfg.tile_n, 16 * P, "N")
    tk = _pow2_divisor(K, cfg.tile_k, 32 if H == 2 else 16, "K")

    def kernel(meta_ref, *refs):
        x_refs, w_refs = refs[:H], refs[H:H + len(ws)]
        b_ref, o_ref = refs[H + len(ws):]
        j, i = pl.program_id(0), pl.program_id(1)
        tile, e, lo, hi, end = (meta_ref[f, i] for f in range(5))
        r0 = tile * tm

        def step(kk, accs):
            k0 = kk * tk
            x_h = [x_refs[h][pl.ds(r0, tm), pl.ds(k0 // H, tk // H)] for h in range(H)]
            new = []
            for p in range(P):  # gate rows n even, linear rows n odd: strided row loads
                w_h = _weight_tile_gpu(w_refs, e, pl.ds(j * tn + p, tn // P, stride=P), k0, tk)
                new.append(accs[p] + sum(_dot_nt(x_h[h], w_h[h], dtype) for h in range(H)))
            return tuple(new)

        zeros = tuple(jnp.zeros((tm, tn // P), jnp.float32) for _ in range(P))
        accs = jax.lax.fori_loop(0, jnp.where(end > lo, K // tk, 0), step, zeros)
        accs = [accs[p] + b_ref[p, e, 0, pl.ds(j * (tn // P), tn // P)][None, :] for p in range(P)]
        rows = r0 + jax.lax.broadcasted_iota(jnp.int32, (tm, tn // P), 0)
        y = jnp.where(rows < end, _epilogue(accs, cfg), 0.0)
        plgpu.store(o_ref.at[pl.ds(r0, tm), pl.ds(j * (tn // P), tn // P)], y, mask=(rows >= lo) & (rows < hi))

    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((Mp, N // P), jnp.float32),
        grid=(N // tn, meta.shape[1]),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=cfg.interpret,
        name="moe_gmm_swiglu" if P > 1 else "moe_gmm",
    )(meta, *xs, *ws, bias_P1E1n)


def _backward_x_gpu(meta, g_MpN, ws, *, tm, K, cfg: _Config, dtype):
    packed = len(ws) == 2
    H = 2 if packed else 1
    Mp, N = g_MpN.shape
    tn = _pow2_divisor(N, cfg.tile_n, 16, "N")
    tk = _pow2_divisor(K, cfg.tile_k, 32 if packed else 16, "K")

    def kernel(meta_ref, g_ref, *refs):
        w_refs, o_refs = refs[:len(ws)], refs[len(ws):]
        i, kk = pl.program_id(0), pl.program_id(1)
        tile, e, lo, hi, end = (meta_ref[f, i] for f in range(5))
        r0 = tile * tm

        def step(jn, accs):
            g = g_ref[pl.ds(r0, tm), pl.ds(jn * tn, tn)]
            w_h = _weight_tile_gpu(w_refs, e, pl.ds(jn * tn, tn), kk * tk, tk)
            return tuple(accs[h] + _dot_nn(g, w_h[h], dtype) for h in range(H))

        zeros = tuple(jnp.zeros((tm, tk // H), jnp.float32) for _ in range(H))
        accs = jax.lax.fori_loop(0, jnp.where(end > lo, N // tn, 0), step, zeros)
        rows = r0 + jax.lax.broadcasted_iota(jnp.int32, (tm, tk // H), 0)
        for h in range(H):
            plgpu.store(o_refs[h].at[pl.ds(r0, tm), pl.ds(kk * (tk // H), tk // H)],
                        jnp.where(rows < end, accs[h], 0.0), mask=(rows >= lo) & (rows < hi))

    return pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct((Mp, K // H), jnp.float32)] * H,
        grid=(meta.shape[1], K // tk),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=cfg.interpret,
        name="moe_gmm_dx",
    )(meta, g_MpN, *ws)


# ---------------------------------------------------------------------------------------------------------------
# Wrappers: padding, work items, the even/odd split, and the custom VJP.
# ---------------------------------------------------------------------------------------------------------------


def _row_tile(M: int, E: int, cfg: _Config) -> int:
    """Rows per work item: `tile_m` if given, else the mean rows per expert (at most the backend's default tile).
    Decode-shaped calls thus get small tiles: at batch 64 (256 rows over 32 experts) a 128-row tile would issue
    16x the useful FLOPs, which makes the decode compute-bound on a TPU v5e (experiments/bench_kernels.md)."""
    rows = cfg.tile_m or min(_TILES[cfg.backend][0], -(-M // E))
    if cfg.backend == "gpu":  # a power of two, >= 16 for the tensor cores
        return max(16, pl.next_power_of_2(min(rows, M)))
    return -(-min(rows, M) // 8) * 8


def _weight_arrays(w):
    return (w.blocks, w.scales) if isinstance(w, Packed) else (w,)


def _forward(x_MK, group_sizes_E, w, bias_EN, cfg: _Config):
    M, K = x_MK.shape
    E, N = bias_EN.shape
    P = 1 if cfg.swiglu is None else 2
    tm = _row_tile(M, E, cfg)
    num_tiles = -(-M // tm)
    with jax.named_scope("moe_gmm_fwd"):
        x_MpK = jnp.pad(x_MK, ((0, num_tiles * tm - M), (0, 0)))
        xs = (x_MpK[:, 0::2], x_MpK[:, 1::2]) if isinstance(w, Packed) else (x_MpK,)
        meta = work_items(group_sizes_E, num_tiles, tm)
        # [P, E, 1, N/P]: part p holds the bias of rows n = p (mod P), so the gate and linear biases come apart.
        bias_P1E1n = bias_EN.astype(jnp.float32).reshape(E, N // P, P).transpose(2, 0, 1)[:, :, None, :]
        fwd = _forward_tpu if cfg.backend == "tpu" else _forward_gpu
        out = fwd(meta, xs, _weight_arrays(w), bias_P1E1n, tm=tm, cfg=cfg, dtype=x_MK.dtype)
    return out[:M]


def _backward(cfg: _Config, res, g):
    x_MK, group_sizes_E, w, bias_EN = res
    M, K = x_MK.shape
    E, N = bias_EN.shape
    if cfg.swiglu is not None:  # recompute the pre-activation, then through the SwiGLU in XLA
        h_MN = _forward(x_MK, group_sizes_E, w, bias_EN, cfg._replace(swiglu=None))
        g = jax.vjp(lambda h: swiglu(h, *cfg.swiglu), h_MN)[1](g)[0]
    tm = _row_tile(M, E, cfg)
    num_tiles = -(-M // tm)
    with jax.named_scope("moe_gmm_bwd"):
        e_M, valid_M = expert_of_rows(group_sizes_E, M)
        g_MN = jnp.where(valid_M[:, None], g, 0.0)
        g_MpN = jnp.pad(g_MN, ((0, num_tiles * tm - M), (0, 0))).astype(x_MK.dtype)
        meta = work_items(group_sizes_E, num_tiles, tm)
        bwd = _backward_x_tpu if cfg.backend == "tpu" else _backward_x_gpu
        dx = bwd(meta, g_MpN, _weight_arrays(w), tm=tm, K=K, cfg=cfg, dtype=x_MK.dtype)
        dx_MK = jnp.stack(dx, axis=-1).reshape(num_tiles * tm, K)[:M].astype(x_MK.dtype)  # even/odd interleave
        db_EN = jax.ops.segment_sum(g_MN, e_M, num_segments=E).astype(bias_EN.dtype)
        if isinstance(w, Packed):  # frozen bytes: no gradient
            dw = jax.tree.map(lambda a: np.zeros(a.shape, jax.dtypes.float0), w)
        else:  # dW[e] = sum over e's rows of dy^T x
            dims = jax.lax.RaggedDotDimensionNumbers((((0,), (0,)), ((), ())), lhs_ragged_dimensions=[0],
                                                     rhs_group_dimensions=[])
            dw = jax.lax.ragged_dot_general(g_MN.astype(x_MK.dtype), x_MK, group_sizes_E.astype(jnp.int32), dims,
                                            preferred_element_type=jnp.float32).astype(w.dtype)
    return dx_MK, np.zeros(group_sizes_E.shape, jax.dtypes.float0), dw, db_EN


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _gmm(x_MK, group_sizes_E, w, bias_EN, cfg):
    return _forward(x_MK, group_sizes_E, w, bias_EN, cfg)


_gmm.defvjp(lambda x, gs, w, b, cfg: (_forward(x, gs, w, b, cfg), (x, gs, w, b)), _backward)


def grouped_matmul_pallas(x_MK, group_sizes_E, w, bias_EN, *, tile_m: int | None = None,
                          tile_n: int | None = None, tile_k: int | None = None, backend: str | None = None,
                          interpret: bool = False):
    """Same contract as `grouped_matmul_xla`: y[m] = W[e(m)] @ x[m] + bias[e(m)], float32 [M, N].

    `w`: `Packed` MXFP4 (decoded in the kernel, frozen) or dense [E, N, K] (differentiable). `backend`: 'tpu'
    (Mosaic) or 'gpu' (Triton), by default `jax.default_backend()`; `interpret=True` runs either on CPU.
    Tiles default per backend (`_TILES`); `tile_k` applies to the GPU kernel only.
    """
    return _gmm(x_MK, group_sizes_E, w, bias_EN, _config(backend, interpret, tile_m, tile_n, tile_k))


def grouped_matmul_swiglu_pallas(x_MK, group_sizes_E, w, bias_EN, *, alpha: float, limit: float,
                                 tile_m: int | None = None, tile_n: int | None = None, tile_k: int | None = None,
                                 backend: str | None = None, interpret: bool = False):
    """Same contract as `grouped_matmul_swiglu_xla`: swiglu(grouped matmul), float32 [M, N/2], fused in the
    kernel's epilogue (options as `grouped_matmul_pallas`)."""
    cfg = _config(backend, interpret, tile_m, tile_n, tile_k, (float(alpha), float(limit)))
    return _gmm(x_MK, group_sizes_E, w, bias_EN, cfg)
