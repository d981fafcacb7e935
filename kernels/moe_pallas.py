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

On TPU the kernel reads the weights in the layout the TPU gives such arrays by default, so that no copy of them
is made before the call: XLA:TPU picks the layout of a [E, N, C] array that pads least, often with N minor-most
(gpt-oss's codes [E, N, 1440] and its dense [E, 5760, 2880] weights), and a Mosaic kernel can only read row-major
operands. The kernel then takes the weights as [E, C, N] (`jnp.swapaxes`, a bitcast in that layout) and
multiplies x [m, C] by [C, n] tiles; otherwise (row-major weights, and always on GPU) it takes [E, N, C] and
multiplies by [n, C].T (`tpu_weight_layout` decides). Two layouts are beyond it, and cost a copy at each call:
the scales' (1/16 of the codes' bytes; the TPU stores [E, N, 90] with N or E minor-most), and the expert-minor
layout the TPU gives [128, 2880, C] arrays (the 120b's mlp2), which a caller has to place as [E, C, N]
(`jax.device_put` with a `jax.experimental.layout.Format`, major_to_minor (0, 2, 1)).

The fused SwiGLU epilogue (the first expert matmul) computes the interleaved pre-activation tile, then takes its
gate (n even) and linear (n odd) columns apart: on TPU with lane gathers inside each 128-lane vreg (Mosaic has no
strided lane loads), on GPU as two products over the even and the odd weight rows (strided row loads). The
activation [M, N/2] leaves the kernel directly.

Gradients (`jax.custom_vjp`): dx through a transposed kernel over the same packed weights (dx = dy @ W[e]),
dbias as segment sums, and for dense weights dW with `jax.lax.ragged_dot_general` on TPU (produced in the
weights' layout) and a Triton kernel on GPU (XLA:GPU's ragged dot expands to a masked copy of x per expert);
packed weights are frozen (float0). The SwiGLU's backward recomputes the pre-activation with the plain kernel.
Backward products take their operands in x's dtype (bf16 for bf16 models), accumulating in float32.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from gptoss_kernels.moe import expert_of_rows, expert_tiles, swiglu_parts
from gptoss_kernels.mxfp4 import Packed

# Default tiles (rows, output columns, contraction). TPU: K is never tiled (the scales' K/32 columns must be whole
# blocks); the output lanes of a tile must be a multiple of 128. GPU (Triton): every tile side a power of two.
_TILES = {"tpu": (128, 256, None), "gpu": (64, 128, 64)}


class _Config(NamedTuple):
    backend: str
    interpret: bool
    tile_m: int
    tile_n: int
    tile_k: int | None
    swiglu: tuple[float, float] | None  # (alpha, limit) for the fused epilogue
    weight_layout: str | None  # TPU: "nk" ([E, N, C] row-major), "kn" ([E, C, N]) or None (the TPU's default)


def _config(backend, interpret, tile_m, tile_n, tile_k, swiglu_args=None, weight_layout=None) -> _Config:
    backend = backend or jax.default_backend()
    if backend not in _TILES:
        raise ValueError(f"the MoE kernel targets 'tpu' or 'gpu', got backend={backend!r} "
                         "(on CPU pass backend='tpu' or 'gpu' with interpret=True)")
    if weight_layout not in (None, "nk", "kn"):
        raise ValueError(f"weight_layout must be 'nk', 'kn' or None, got {weight_layout!r}")
    dm, dn, dk = _TILES[backend]
    return _Config(backend, interpret, tile_m, tile_n or dn, tile_k or dk, swiglu_args, weight_layout)


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


def _expand_scales_matmul(scale_RG, shape) -> jax.Array:
    """[R, G] -> [R, B] (`shape`) with each scale repeated B/G times along the lanes, as a product with a 0/1
    matrix: Mosaic has no lane repeat, and a product of powers of two by 0/1 (one term a sum) is exact, in bf16
    operands too."""
    G, B = scale_RG.shape[1], shape[1]
    # 16 bytes a scale group; a shift, as integer division lowers through `sign`, which Mosaic lowers only
    # knowing the TPU generation (unknown when exporting from a CPU host).
    g_of_b = jax.lax.broadcasted_iota(jnp.int32, (G, B), 1) >> 4
    expand_GB = (g_of_b == jax.lax.broadcasted_iota(jnp.int32, (G, B), 0)).astype(jnp.bfloat16)
    return jnp.dot(scale_RG.astype(jnp.bfloat16), expand_GB, preferred_element_type=jnp.float32)


def _expand_scales_reshape(scale_RG, shape) -> jax.Array:
    """[R, G] -> [R, B] by a broadcast and a reshape (Triton)."""
    R, G = scale_RG.shape
    return jnp.broadcast_to(scale_RG[:, :, None], (R, G, shape[1] // G)).reshape(shape)


def _expand_scales_sublanes(scale_GR, shape) -> jax.Array:
    """[G, R] -> [B, R] with each row repeated B/G = 16 times: a sublane broadcast and a reshape that merges whole
    sublane tiles, both of which Mosaic lowers (the transposed-weight tiles, codes [B, R])."""
    G, R = scale_GR.shape
    return jnp.broadcast_to(scale_GR[:, None, :], (G, shape[0] // G, R)).reshape(shape)


def _decode(codes, scales, expand) -> tuple[jax.Array, jax.Array]:
    """Packed codes (uint8, K/2 along one axis) and their scales (K/32 along the same axis) -> the decoded even and
    odd K elements, float32 of the codes' shape each; `expand` repeats the scales to that shape. Exact for scale
    bytes 1..254 (byte 0, 2^-127, decodes to 0; 255 is NaN in E8M0)."""
    c = codes.astype(jnp.int32)
    scale = jax.lax.bitcast_convert_type(scales.astype(jnp.int32) << 23, jnp.float32)  # 2^(s - 127)
    scale = expand(scale, c.shape)
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
# TPU (Mosaic). Grid (N tiles, items) forward, (items, N tiles) for dx; K whole in every block. Weights "kn"
# ([E, C, N], tiles [C, n]) or "nk" ([E, N, C], tiles [n, C]), C = K/2 packed, K dense: see the module docstring.
# ---------------------------------------------------------------------------------------------------------------


def tpu_weight_layout(shape, dtype) -> str:
    """"kn" if a TPU stores an array of `shape` [..., N, C] with N minor-most and C next by default, else "nk".

    On a TPU host this asks the TPU client. Elsewhere (compiling for a TPU from a CPU host) it applies the rule the
    TPU compiler follows (libtpu 0.0.42.1, the same on v5e, v5p and v6e; tests/accel checks it against the
    compiler) between these two: the one that pads less, the minor dimension to 128 lanes and the next to 8
    sublanes, row-major on a tie. (The compiler may pick a third, e.g. experts minor-most; then either reading
    costs a copy.) A wrong guess costs a copy of the weights before the call, never a wrong result."""
    shape = tuple(int(d) for d in shape)
    if jax.default_backend() == "tpu":
        try:
            device = jax.local_devices()[0]
            text = str(device.client.get_default_layout(np.dtype(dtype), shape, device))
            minor_to_major = tuple(int(d) for d in text[1:text.index(":")].split(","))
            return "kn" if minor_to_major[:2] == (len(shape) - 2, len(shape) - 1) else "nk"
        except Exception:  # noqa: BLE001  (the rule below is the fallback)
            pass
    n, c = shape[-2:]

    def pad(a, b):
        return -(-a // b) * b

    return "kn" if pad(c, 8) * pad(n, 128) < pad(n, 8) * pad(c, 128) else "nk"


def _tpu_tile_n(tile_n: int, N: int, parts: int) -> int:
    """Whole N, or a multiple of 128 lanes per part (a last partial tile is clipped by Pallas)."""
    if N <= tile_n:
        return N
    if tile_n % (128 * parts):
        raise ValueError(f"TPU tile_n={tile_n} must be a multiple of {128 * parts} (or >= N={N})")
    return tile_n


def _lanes_of_parity(v, p: int) -> jax.Array:
    """v[:, p::2] [r, n/2] for p in {0, 1}: lane gathers inside each 128-lane vreg, then a lane select per output
    vreg (Mosaic has no strided lane loads). Index (2i + p) mod 128 puts the picked lanes of a vreg in lanes
    0..63 and again in 64..127, so output vreg c is gather(v's vreg 2c) on lanes < 64 and gather(vreg 2c + 1)
    on the rest."""
    r, n = v.shape
    if n % 256:  # a whole-N tile narrower than two vregs (small shapes): one gather
        lane = jax.lax.broadcasted_iota(jnp.int32, (r, n), 1)
        return jnp.take_along_axis(v, jnp.minimum(2 * lane + p, n - 1), axis=1)[:, :n // 2]
    lane = jax.lax.broadcasted_iota(jnp.int32, (r, 128), 1)
    idx = (2 * lane + p) & 127
    parts = []
    for c in range(n // 256):
        lo = jnp.take_along_axis(v[:, 256 * c:256 * c + 128], idx, axis=1)
        hi = jnp.take_along_axis(v[:, 256 * c + 128:256 * c + 256], idx, axis=1)
        parts.append(jnp.where(lane < 64, lo, hi))
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)


def _weight_tile_tpu(w_refs, kn: bool):
    """The block's weight tile as float32 (packed: decoded even and odd K halves) or as stored (dense)."""
    if len(w_refs) == 1:
        return (w_refs[0][...],)
    expand = _expand_scales_sublanes if kn else _expand_scales_matmul
    return _decode(w_refs[0][...], w_refs[1][...], expand)


def _weight_specs_tpu(ws, tn, kn, expert_and_n_tile):
    """BlockSpecs of one expert's N tile of each weight array; `expert_and_n_tile(*grid, meta) -> (e, j)`."""
    def index(*args):
        e, j = expert_and_n_tile(*args)
        return (e, 0, j) if kn else (e, j, 0)
    return [pl.BlockSpec((None, a.shape[1], tn) if kn else (None, tn, a.shape[2]), index) for a in ws]


def _forward_tpu(meta, xs, ws, bias_E1N, *, kn, tm, cfg: _Config, dtype):
    H, P = len(xs), 1 if cfg.swiglu is None else 2
    Mp, Kh = xs[0].shape
    N = ws[0].shape[2 if kn else 1]
    tn = _tpu_tile_n(cfg.tile_n, N, P)
    dot = _dot_nn if kn else _dot_nt

    def kernel(meta_ref, *refs):
        x_refs, w_refs = refs[:H], refs[H:H + len(ws)]
        b_ref, o_ref, cache_ref = refs[H + len(ws):]
        i = pl.program_id(1)
        tile, e, lo, hi, end = (meta_ref[f, i] for f in range(5))

        # Decode the expert's K x tn tile into VMEM only when the expert changes: consecutive items of one
        # expert (its row tiles) reuse it, so prefill decodes each weight once per N tile.
        @pl.when((i == 0) | (e != meta_ref[1, jnp.maximum(i - 1, 0)]))
        def _decode_tile():
            for h, w_h in enumerate(_weight_tile_tpu(w_refs, kn)):
                cache_ref[h] = w_h.astype(cache_ref.dtype)

        rows = tile * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
        write = (rows >= lo) & (rows < hi)

        @pl.when(end > lo)
        def _compute():
            acc = sum(dot(x_refs[h][...], cache_ref[h], dtype) for h in range(H)) + b_ref[...]
            if P == 2:  # interleaved gate (n even) and linear (n odd) columns
                acc = swiglu_parts(_lanes_of_parity(acc, 0), _lanes_of_parity(acc, 1), *cfg.swiglu)
            o_ref[...] = jnp.where(write, jnp.where(rows < end, acc, 0.0), o_ref[...])

        @pl.when(end <= lo)
        def _padding():
            o_ref[...] = jnp.where(write, 0.0, o_ref[...])

    x_spec = pl.BlockSpec((tm, Kh), lambda j, i, meta: (meta[0, i], 0))
    w_specs = _weight_specs_tpu(ws, tn, kn, lambda j, i, meta: (meta[1, i], j))
    b_spec = pl.BlockSpec((None, 1, tn), lambda j, i, meta: (meta[1, i], 0, j))
    cache = pltpu.VMEM((H, Kh, tn) if kn else (H, tn, Kh), dtype)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((Mp, N // P), jnp.float32),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(pl.cdiv(N, tn), meta.shape[1]),
            in_specs=[x_spec] * H + w_specs + [b_spec],
            out_specs=pl.BlockSpec((tm, tn // P), lambda j, i, meta: (meta[0, i], j)),
            scratch_shapes=[cache]),
        # Items revisit output tiles and reuse the decode cache: sequential; N tiles split across cores.
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=cfg.interpret,
        name="moe_gmm_swiglu" if P > 1 else "moe_gmm",
    )(meta, *xs, *ws, bias_E1N)


def _backward_x_tpu(meta, g_MpN, ws, *, kn, tm, K, cfg: _Config, dtype):
    """dx halves [Mp, K/H] float32: dx[m] = dy[m] @ W[e(m)], reducing over N tiles (the last grid axis)."""
    packed = len(ws) == 2
    H = 2 if packed else 1
    Mp, N = g_MpN.shape
    Kh = K // H
    tn = _tpu_tile_n(cfg.tile_n, N, 1)
    num_n = pl.cdiv(N, tn)
    dot = _dot_nt if kn else _dot_nn

    def kernel(meta_ref, g_ref, *refs):
        w_refs, o_refs, acc_ref = refs[:len(ws)], refs[len(ws):len(ws) + H], refs[-1]
        i, j = pl.program_id(0), pl.program_id(1)
        tile, e, lo, hi, end = (meta_ref[f, i] for f in range(5))

        @pl.when(j == 0)
        def _zero():
            acc_ref[...] = jnp.zeros_like(acc_ref)

        @pl.when(end > lo)
        def _accumulate():
            halves = _weight_tile_tpu(w_refs, kn)
            g = g_ref[...]
            if N % tn:  # the clipped last tile holds garbage past N, in both operands: zero it (0 * NaN = NaN)
                g = jnp.where(jax.lax.broadcasted_iota(jnp.int32, g.shape, 1) < N - j * tn, g, 0)
                valid_n = jax.lax.broadcasted_iota(jnp.int32, (1, tn) if kn else (tn, 1), 1 if kn else 0)
                halves = [jnp.where(valid_n < N - j * tn, w_h, 0) for w_h in halves]
            for h in range(H):
                acc_ref[h] += dot(g, halves[h], dtype)

        @pl.when(j == num_n - 1)
        def _store():
            rows = tile * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
            write = (rows >= lo) & (rows < hi)
            for h in range(H):
                o_refs[h][...] = jnp.where(write, jnp.where(rows < end, acc_ref[h], 0.0), o_refs[h][...])

    w_specs = _weight_specs_tpu(ws, tn, kn, lambda i, j, meta: (meta[1, i], j))
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


def _trips(work, n: int) -> jax.Array:
    """A loop's trip count, n or 0, as int32: Triton's scf.for needs its bounds and step of one type, and
    `jnp.where(work, n, 0)` of two Python ints lowers to an i64 bound against the i32 start and step."""
    return jnp.where(work, jnp.int32(n), jnp.int32(0))


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
        accs = jax.lax.fori_loop(0, _trips(end > lo, K // tk), step, zeros)
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
        accs = jax.lax.fori_loop(0, _trips(end > lo, N // tn), step, zeros)
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


def _backward_w_gpu(g_MpN, x_MpK, group_sizes_E, *, tm, cfg: _Config, dtype, out_dtype):
    """Dense dW [E, N, K] = per expert, the sum over its rows of dy^T x. XLA's ragged_dot on GPU expands the
    ragged contraction into a masked dense copy of x per expert (f32 [E, M, K]: 11 GiB for the 120b's 128 experts
    at 8192 rows); here each (expert, N tile, K tile) program walks only its expert's rows, in `tr`-row windows
    aligned to the padded rows (so that no window leaves the arrays), masked to the expert's rows."""
    Mp, N = g_MpN.shape
    K = x_MpK.shape[1]
    E = group_sizes_E.shape[0]
    tn = _pow2_divisor(N, 64, 16, "N")
    tk = _pow2_divisor(K, 64, 16, "K")
    tr = min(32, tm)  # tm is a power of two >= 16 and Mp a multiple of it
    ends_E = jnp.cumsum(group_sizes_E.astype(jnp.int32))
    bounds = jnp.stack([ends_E - group_sizes_E.astype(jnp.int32), ends_E])

    def kernel(bounds_ref, g_ref, x_ref, o_ref):
        e, jn, jk = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        start, end = bounds_ref[0, e], bounds_ref[1, e]
        first = start // tr

        def step(r, acc):
            r0 = (first + r) * tr
            rows = r0 + jax.lax.broadcasted_iota(jnp.int32, (tr, 1), 0)
            mine = (rows >= start) & (rows < end)
            g = plgpu.load(g_ref.at[pl.ds(r0, tr), pl.ds(jn * tn, tn)], mask=jnp.broadcast_to(mine, (tr, tn)),
                           other=0.0)
            x = plgpu.load(x_ref.at[pl.ds(r0, tr), pl.ds(jk * tk, tk)], mask=jnp.broadcast_to(mine, (tr, tk)),
                           other=0.0)
            return acc + jax.lax.dot_general(g.astype(dtype), x.astype(dtype), (((0,), (0,)), ((), ())),
                                             preferred_element_type=jnp.float32, precision=_precision(dtype))

        trips = jnp.where(end > start, (end - 1) // tr - first + 1, jnp.int32(0)).astype(jnp.int32)
        acc = jax.lax.fori_loop(0, trips, step, jnp.zeros((tn, tk), jnp.float32))
        o_ref[e, pl.ds(jn * tn, tn), pl.ds(jk * tk, tk)] = acc.astype(o_ref.dtype)

    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((E, N, K), out_dtype),
        grid=(E, N // tn, K // tk),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=cfg.interpret,
        name="moe_gmm_dw",
    )(bounds, g_MpN, x_MpK)


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


def _tpu_weights(w, cfg: _Config) -> tuple[tuple[jax.Array, ...], bool]:
    """The weight arrays as the TPU kernels read them, and whether transposed ("kn": [E, C, N], see
    `tpu_weight_layout`; the swap is a bitcast when that is the arrays' layout). The scales follow the codes:
    a copy of them (1/16 of the codes' bytes) where their own layout differs."""
    arrays = _weight_arrays(w)
    layout = cfg.weight_layout or tpu_weight_layout(arrays[0].shape, arrays[0].dtype)
    if layout == "kn":
        return tuple(jnp.swapaxes(a, -1, -2) for a in arrays), True
    return arrays, False


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
        if cfg.backend == "tpu":
            ws, kn = _tpu_weights(w, cfg)
            bias_E1N = bias_EN.astype(jnp.float32)[:, None, :]
            out = _forward_tpu(meta, xs, ws, bias_E1N, kn=kn, tm=tm, cfg=cfg, dtype=x_MK.dtype)
        else:
            # [P, E, 1, N/P]: part p holds the bias of rows n = p (mod P): the gate and linear biases apart.
            bias_P1E1n = bias_EN.astype(jnp.float32).reshape(E, N // P, P).transpose(2, 0, 1)[:, :, None, :]
            out = _forward_gpu(meta, xs, _weight_arrays(w), bias_P1E1n, tm=tm, cfg=cfg, dtype=x_MK.dtype)
    return out[:M]


def _backward(cfg: _Config, res, g):
    x_MK, group_sizes_E, w, bias_EN = res
    M, K = x_MK.shape
    E, N = bias_EN.shape
    if cfg.swiglu is not None:  # recompute the pre-activation, then through the SwiGLU in XLA
        h_MN = _forward(x_MK, group_sizes_E, w, bias_EN, cfg._replace(swiglu=None))
        # The gate and linear columns' cotangents, interleaved by a stack: the VJP of the strided slices in
        # `swiglu` (interior-padded pads, added) takes XLA:TPU over 24 GB of host memory to compile at 8192 rows.
        parts = jax.vjp(lambda a, b: swiglu_parts(a, b, *cfg.swiglu), h_MN[:, 0::2], h_MN[:, 1::2])[1](g)
        g = jnp.stack(parts, axis=-1).reshape(h_MN.shape)
    tm = _row_tile(M, E, cfg)
    num_tiles = -(-M // tm)
    with jax.named_scope("moe_gmm_bwd"):
        e_M, valid_M = expert_of_rows(group_sizes_E, M)
        g_MN = jnp.where(valid_M[:, None], g, 0.0)
        g_MpN = jnp.pad(g_MN, ((0, num_tiles * tm - M), (0, 0))).astype(x_MK.dtype)
        meta = work_items(group_sizes_E, num_tiles, tm)
        if cfg.backend == "tpu":
            ws, kn = _tpu_weights(w, cfg)
            dx = _backward_x_tpu(meta, g_MpN, ws, kn=kn, tm=tm, K=K, cfg=cfg, dtype=x_MK.dtype)
        else:
            dx = _backward_x_gpu(meta, g_MpN, _weight_arrays(w), tm=tm, K=K, cfg=cfg, dtype=x_MK.dtype)
        dx_MK = jnp.stack(dx, axis=-1).reshape(num_tiles * tm, K)[:M].astype(x_MK.dtype)  # even/odd interleave
        db_EN = jax.ops.segment_sum(g_MN, e_M, num_segments=E).astype(bias_EN.dtype)
        if isinstance(w, Packed):  # frozen bytes: no gradient
            dw = jax.tree.map(lambda a: np.zeros(a.shape, jax.dtypes.float0), w)
        elif cfg.backend == "gpu":  # dW[e] = sum over e's rows of dy^T x
            x_MpK = jnp.pad(x_MK, ((0, num_tiles * tm - M), (0, 0)))
            dw = _backward_w_gpu(g_MpN, x_MpK, group_sizes_E, tm=tm, cfg=cfg, dtype=x_MK.dtype, out_dtype=w.dtype)
        else:  # TPU: XLA's ragged dot
            dims = jax.lax.RaggedDotDimensionNumbers((((0,), (0,)), ((), ())), lhs_ragged_dimensions=[0],
                                                     rhs_group_dimensions=[])
            a, b = g_MN.astype(x_MK.dtype), x_MK
            # Produced in the weights' own layout: [E, K, N] (then a bitcast) where the TPU stores them N-minor,
            # else XLA copies the whole of dW into that layout.
            kn = (cfg.weight_layout or tpu_weight_layout(w.shape, w.dtype)) == "kn"
            if kn:
                a, b = b, a
            dw = jax.lax.ragged_dot_general(a, b, group_sizes_E.astype(jnp.int32), dims,
                                            preferred_element_type=jnp.float32).astype(w.dtype)
            if kn:
                dw = jnp.swapaxes(dw, 1, 2)
    return dx_MK, np.zeros(group_sizes_E.shape, jax.dtypes.float0), dw, db_EN


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _gmm(x_MK, group_sizes_E, w, bias_EN, cfg):
    return _forward(x_MK, group_sizes_E, w, bias_EN, cfg)


_gmm.defvjp(lambda x, gs, w, b, cfg: (_forward(x, gs, w, b, cfg), (x, gs, w, b)), _backward)


def grouped_matmul_pallas(x_MK, group_sizes_E, w, bias_EN, *, tile_m: int | None = None,
                          tile_n: int | None = None, tile_k: int | None = None, backend: str | None = None,
                          interpret: bool = False, weight_layout: str | None = None):
    """Same contract as `grouped_matmul_xla`: y[m] = W[e(m)] @ x[m] + bias[e(m)], float32 [M, N].

    `w`: `Packed` MXFP4 (decoded in the kernel, frozen) or dense [E, N, K] (differentiable). `backend`: 'tpu'
    (Mosaic) or 'gpu' (Triton), by default `jax.default_backend()`; `interpret=True` runs either on CPU.
    Tiles default per backend (`_TILES`); `tile_k` applies to the GPU kernel only. `weight_layout` (TPU only):
    read the weights as "nk" (row-major) or "kn" (transposed) tiles; by default as the TPU lays them out
    (`tpu_weight_layout`), so that they are not copied.
    """
    cfg = _config(backend, interpret, tile_m, tile_n, tile_k, weight_layout=weight_layout)
    return _gmm(x_MK, group_sizes_E, w, bias_EN, cfg)


def grouped_matmul_swiglu_pallas(x_MK, group_sizes_E, w, bias_EN, *, alpha: float, limit: float,
                                 tile_m: int | None = None, tile_n: int | None = None, tile_k: int | None = None,
                                 backend: str | None = None, interpret: bool = False,
                                 weight_layout: str | None = None):
    """Same contract as `grouped_matmul_swiglu_xla`: swiglu(grouped matmul), float32 [M, N/2], fused in the
    kernel's epilogue (options as `grouped_matmul_pallas`)."""
    cfg = _config(backend, interpret, tile_m, tile_n, tile_k, (float(alpha), float(limit)), weight_layout)
    return _gmm(x_MK, group_sizes_E, w, bias_EN, cfg)
