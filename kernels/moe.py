"""Grouped matmul for the MoE experts: the pure-XLA twin (the specification), and its XLA:CPU forms.

Rows of `x_MK` are sorted by expert; `group_sizes_E` says how many belong to each (empty groups allowed, rows past
their sum are zero). Expert weights are `Packed` MXFP4 [E, N, K/2] + [E, N, K/32] or dense [E, N, K], both in
the checkpoint's (out, in) orientation. Only the experts that own rows are ever dequantized, one at a time.

`grouped_matmul_xla` is the specification. `rowwise_matmul_xla` (decode) and `expert_loop_matmul_xla` (prefill)
compute the same thing in the forms XLA:CPU runs fast; `gptoss_jax.ops.grouped_matmul` chooses, and
docs/cpu_performance.md has the measurements.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from gptoss_kernels.mxfp4 import Packed, dequantize


def expert_matrix(w, e, dtype) -> jax.Array:
    """Expert `e`'s [N, K] matrix in `dtype` (dequantized when packed)."""
    if isinstance(w, Packed):
        return dequantize(w.blocks[e], w.scales[e], dtype)
    return w[e].astype(dtype)


def expert_tiles(group_sizes_E, tm: int):
    """Per expert, for `tm`-row tiles of the expert-sorted rows: (first row, end row, first tile, tiles its rows
    touch, cumulative tiles = the end of its (row tile, expert) work items)."""
    sizes_E = group_sizes_E.astype(jnp.int32)
    ends_E = jnp.cumsum(sizes_E)
    starts_E = ends_E - sizes_E
    first_tile_E = starts_E // tm
    tiles_E = jnp.where(sizes_E > 0, (ends_E - 1) // tm - first_tile_E + 1, 0)
    return starts_E, ends_E, first_tile_E, tiles_E, jnp.cumsum(tiles_E)


def grouped_matmul_xla(x_MK, group_sizes_E, w, bias_EN, *, tile_m: int = 128):
    """y[m] = W[e(m)] @ x[m] + bias[e(m)] in float32, [M, N].

    Work is split into (row tile, expert) items as in megablox: each item dequantizes one expert and multiplies
    one tile of rows, keeping only that expert's rows. There are at most tiles + E - 1 such items, so the FLOPs
    stay within a tile of the ragged ideal and decode touches only the routed experts.
    """
    M, K = x_MK.shape
    E, N = bias_EN.shape
    tm = min(tile_m, -(-M // 8) * 8)
    num_tiles = -(-M // tm)
    x_MK = jnp.pad(x_MK, ((0, num_tiles * tm - M), (0, 0)))

    starts_E, ends_E, first_tile_E, tiles_E, item_ends_E = expert_tiles(group_sizes_E, tm)
    item_starts_E = item_ends_E - tiles_E

    def item(out_MN, i):
        e = jnp.minimum(jnp.searchsorted(item_ends_E, i, side="right"), E - 1)
        row0 = (first_tile_E[e] + i - item_starts_E[e]) * tm

        def compute(out_MN):
            x_tK = jax.lax.dynamic_slice_in_dim(x_MK, row0, tm)
            y_tN = jnp.dot(x_tK, expert_matrix(w, e, x_MK.dtype).T, preferred_element_type=jnp.float32)
            y_tN = y_tN + bias_EN[e].astype(jnp.float32)
            rows = row0 + jnp.arange(tm)
            mine = (rows >= starts_E[e]) & (rows < ends_E[e])
            old_tN = jax.lax.dynamic_slice_in_dim(out_MN, row0, tm)
            return jax.lax.dynamic_update_slice_in_dim(out_MN, jnp.where(mine[:, None], y_tN, old_tN), row0, 0)

        return jax.lax.cond(i < item_ends_E[-1], compute, lambda o: o, out_MN), None

    out_MN = jnp.zeros((num_tiles * tm, N), jnp.float32)
    out_MN, _ = jax.lax.scan(item, out_MN, jnp.arange(num_tiles + E - 1))
    return out_MN[:M]


def swiglu_parts(gate, lin, alpha: float, limit: float):
    """gpt-oss's clamped SwiGLU of the gate and the linear halves, already apart (note the +1)."""
    gate = jnp.minimum(gate, limit)
    lin = jnp.clip(lin, -limit, limit)
    return gate * jax.nn.sigmoid(alpha * gate) * (lin + 1.0)


def swiglu(h, alpha: float, limit: float):
    """Interleaved columns: h[..., 0::2] is the gate, h[..., 1::2] the linear half."""
    return swiglu_parts(h[..., 0::2], h[..., 1::2], alpha, limit)


def grouped_matmul_swiglu_xla(x_MK, group_sizes_E, w, bias_EN, *, alpha: float, limit: float):
    """The first expert matmul with its activation: swiglu(grouped_matmul_xla(...)), float32 [M, N/2].

    Rows past the groups stay zero, as swiglu(0) = 0.
    """
    return swiglu(grouped_matmul_xla(x_MK, group_sizes_E, w, bias_EN), alpha, limit)


# ---------------------------------------------------------------------------------------------------------------
# XLA:CPU forms. Both compute the even and the odd columns of each weight matrix as two products (against x[0::2]
# and x[1::2]): packed experts then decode each byte's two nibbles into two contiguous arrays, and dense experts
# take the very same path, so the two layouts of one model give bit-identical results in the prefill form (and in
# bf16 in both; in float32 the row-by-row form may differ in the last bit, as LLVM vectorizes the two weight
# producers differently). Forward only; their gradient is the specification's (`grouped_matmul_xla`), through a
# custom VJP.
# ---------------------------------------------------------------------------------------------------------------


def expert_of_rows(group_sizes_E, M: int) -> tuple[jax.Array, jax.Array]:
    """For expert-sorted rows: each row's expert [M] (int32) and whether the row lies inside the groups [M]."""
    ends_E = jnp.cumsum(group_sizes_E.astype(jnp.int32))
    rows = jnp.arange(M, dtype=jnp.int32)
    e_M = jnp.searchsorted(ends_E, rows, side="right").astype(jnp.int32)
    return jnp.minimum(e_M, group_sizes_E.shape[0] - 1), rows < ends_E[-1]


def fp4_values(codes_u32) -> jax.Array:
    """FP4 (E2M1) codes 0..15 (uint32) -> 2 x their value, float32, with integer ops only (no table gather).

    |2 x value| for codes 0..7 is 0, 1, 2, 3, 4, 6, 8, 12: one nibble each of the constant 0xC8643210, picked
    out with a variable shift. Exact, and free of subnormals (so immune to flush-to-zero). Code 8 gives +0.
    """
    mag2 = ((jnp.uint32(0xC8643210) >> ((codes_u32 & 7) << 2)) & 0xF).astype(jnp.int32)
    return jnp.where(codes_u32 >= 8, -mag2, mag2).astype(jnp.float32)


def _mxfp4_bits(codes, s, dtype):
    """FP4 codes (uint32, 0..15) times 2^(s - 127) (uint32 scale bytes, broadcast) as `dtype` (bfloat16 or
    float32), assembled bit by bit with integer ops: no conversion, no multiply, no rounding. Exact while
    2 <= s <= 252 (the result is then a normal number or zero); the caller checks that. Code 8 gives -0."""
    mant_bits = {jnp.dtype(jnp.bfloat16): 7, jnp.dtype(jnp.float32): 23}[jnp.dtype(dtype)]
    e, m = (codes >> 1) & 3, codes & 1
    # e > 0: 2^(e-1) (1 + m/2) 2^(s-127), biased exponent e + s - 1; e == 0, m == 1: 0.5 x 2^(s-127) = 2^(s-128).
    exponent = jnp.where(e > 0, e + s - 1, s - 1)
    mantissa = jnp.where(e > 0, m << (mant_bits - 1), 0)
    width = 16 if mant_bits == 7 else 32
    bits = jnp.where((codes & 7) == 0, 0, (exponent << mant_bits) | mantissa) | ((codes & 8) << (width - 4))
    if width == 16:
        return jax.lax.bitcast_convert_type(bits.astype(jnp.uint16), jnp.bfloat16)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _two_products(x_K, w_even_NB, w_odd_NB) -> jax.Array:
    """sum_k W[n, k] x[k] as two fused matrix-vector products over the even and the odd columns; float32 [N].

    XLA:CPU turns `f32[1, K'] @ f32[N, K'].T` (K' < 4096) into one loop fusion that computes its weight operand
    element by element on the fly, on both cores. Measured on a 5760 x 2880 MXFP4 matrix (2 cores), against
    1.3 ms for the same product from bf16 weights:
    - the weight operand must map one weight to one byte: the interleaved (low, high nibble) operand makes LLVM
      load every byte with a scalar insert (4.5 ms); as two products over the same bytes, 2.0 ms;
    - the optimization barrier keeps XLA from fusing their sum into the second dot, which loses the rewrite
      (11.7 ms);
    - the bytes must come from a buffer shaped [N, K/2]: read through a reshape of [N, K/32, 16], every load goes
      through a div/mod index and is scalarized again (8.3 ms). See docs/cpu_performance.md.
    """
    x_2 = x_K.astype(jnp.float32).reshape(1, -1, 2)
    even = jnp.dot(x_2[:, :, 0], w_even_NB.astype(jnp.float32).T)
    odd = jnp.dot(x_2[:, :, 1], w_odd_NB.astype(jnp.float32).T)
    even, odd = jax.lax.optimization_barrier((even, odd))
    return (even + odd)[0]


def _rowwise_forward(x_MK, group_sizes_E, w, bias_EN):
    M, K = x_MK.shape
    e_M, valid_M = expert_of_rows(group_sizes_E, M)
    if isinstance(w, Packed):
        E, N, B = w.blocks.shape
        G = w.scales.shape[-1]

        def row(x_K, e):
            codes = jax.lax.dynamic_index_in_dim(w.blocks, e, keepdims=False).astype(jnp.uint32)
            s = jax.lax.dynamic_index_in_dim(w.scales, e, keepdims=False)
            scale = jax.lax.bitcast_convert_type(s, jnp.float8_e8m0fnu).astype(jnp.float32) * 0.5  # fp4_values: 2x
            scale = jnp.broadcast_to(scale[:, :, None], (N, G, B // G)).reshape(N, B)
            return _two_products(x_K, fp4_values(codes & 0xF) * scale, fp4_values(codes >> 4) * scale)
    else:
        def row(x_K, e):
            w_NK = jax.lax.dynamic_index_in_dim(w, e, keepdims=False)
            return _two_products(x_K, w_NK[:, 0::2], w_NK[:, 1::2])

    y_MN = jnp.stack([row(x_MK[m], e_M[m]) for m in range(M)])
    y_MN = y_MN + jnp.take(bias_EN, e_M, axis=0).astype(jnp.float32)
    return jnp.where(valid_M[:, None], y_MN, 0.0)


def decode_halves(blocks_NB, scales_NG, dtype) -> tuple[jax.Array, jax.Array]:
    """An MXFP4 matrix's even and odd columns, [N, K/2] each in `dtype` (exact): the low and the high nibbles,
    decoded in the blocks' own shape so that every output run reads contiguous bytes (3.4 ms for a 5760 x 2880
    matrix; 30 ms decoded into the natural interleaved order, 7.9 ms into one [N, 2, K/2] array).

    For bf16 / f32 the values are assembled from bits (no conversion, multiply or rounding: 4x faster), unless a
    scale lies outside [2, 252] (never in the real checkpoints) where that shortcut would leave the normal range;
    then the arithmetic decode runs instead.
    """
    N, G = scales_NG.shape
    blocks_NGB = blocks_NB.reshape(N, G, -1)
    nb = blocks_NGB.shape[-1]

    def arithmetic(_):
        codes = blocks_NGB.astype(jnp.uint32)  # inside each branch, so that it fuses into the decode
        scale = (jax.lax.bitcast_convert_type(scales_NG, jnp.float8_e8m0fnu).astype(jnp.float32) * 0.5)[:, :, None]
        return tuple((fp4_values(c) * scale).astype(dtype).reshape(N, G * nb) for c in (codes & 0xF, codes >> 4))

    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)):
        return arithmetic(None)

    def bits(_):
        codes, s = blocks_NGB.astype(jnp.uint32), scales_NG.astype(jnp.uint32)[:, :, None]
        return tuple(_mxfp4_bits(c, s, dtype).reshape(N, G * nb) for c in (codes & 0xF, codes >> 4))

    in_range = jnp.all((scales_NG >= 2) & (scales_NG <= 252))
    return jax.lax.cond(in_range, bits, arithmetic, None)


def _expert_loop_forward(x_MK, group_sizes_E, w, bias_EN, tile_m=None):
    M, K = x_MK.shape
    E, N = bias_EN.shape
    if tile_m is None:
        tile_m = -(-math.ceil(1.3 * M / E) // 16) * 16
    tm = min(tile_m, -(-M // 8) * 8)
    # Rows padded so a tile may start at any row < M; even and odd columns apart, as the weights are split;
    # materialized once (left to itself XLA recomputes them inside the loop, per expert).
    x_pad = jnp.pad(x_MK, ((0, tm), (0, 0)))
    x_even, x_odd = jax.lax.optimization_barrier((x_pad[:, 0::2], x_pad[:, 1::2]))
    sizes_E = group_sizes_E.astype(jnp.int32)
    ends_E = jnp.cumsum(sizes_E)
    starts_E = ends_E - sizes_E
    dims = (((1,), (1,)), ((), ()))

    def halves(e):
        if isinstance(w, Packed):
            return decode_halves(jax.lax.dynamic_index_in_dim(w.blocks, e, keepdims=False),
                                 jax.lax.dynamic_index_in_dim(w.scales, e, keepdims=False), x_MK.dtype)
        w_NK = jax.lax.dynamic_index_in_dim(w, e, keepdims=False).astype(x_MK.dtype)
        return w_NK[:, 0::2], w_NK[:, 1::2]

    def expert(e, out_MN):
        def compute(out_MN):
            lo, hi = halves(e)
            bias_N = jax.lax.dynamic_index_in_dim(bias_EN, e, keepdims=False).astype(jnp.float32)

            def tile(t, out_MN):
                r0 = starts_E[e] + t * tm
                y = (jax.lax.dot_general(jax.lax.dynamic_slice_in_dim(x_even, r0, tm), lo, dims,
                                         preferred_element_type=jnp.float32)
                     + jax.lax.dot_general(jax.lax.dynamic_slice_in_dim(x_odd, r0, tm), hi, dims,
                                           preferred_element_type=jnp.float32) + bias_N)
                mine = (r0 + jnp.arange(tm) < ends_E[e])[:, None]
                old = jax.lax.dynamic_slice_in_dim(out_MN, r0, tm)
                return jax.lax.dynamic_update_slice_in_dim(out_MN, jnp.where(mine, y, old), r0, 0)

            return jax.lax.fori_loop(0, -(-sizes_E[e] // tm), tile, out_MN)

        return jax.lax.cond(sizes_E[e] > 0, compute, lambda o: o, out_MN)

    out_MN = jax.lax.fori_loop(0, E, expert, jnp.zeros((M + tm, N), jnp.float32))
    return out_MN[:M]


def _with_spec_gradient(forward):
    """`forward` (same contract as grouped_matmul_xla) with the specification's gradient."""

    @jax.custom_vjp
    def f(x_MK, group_sizes_E, w, bias_EN):
        return forward(x_MK, group_sizes_E, w, bias_EN)

    def fwd(x_MK, group_sizes_E, w, bias_EN):
        return forward(x_MK, group_sizes_E, w, bias_EN), (x_MK, group_sizes_E, w, bias_EN)

    def bwd(res, g_MN):
        x_MK, group_sizes_E, w, bias_EN = res
        if isinstance(w, Packed):  # frozen bytes: no gradient
            _, vjp = jax.vjp(lambda x, b: grouped_matmul_xla(x, group_sizes_E, w, b), x_MK, bias_EN)
            g_x, g_b = vjp(g_MN)
            g_w = jax.tree.map(lambda a: np.zeros(a.shape, jax.dtypes.float0), w)
        else:
            _, vjp = jax.vjp(lambda x, w, b: grouped_matmul_xla(x, group_sizes_E, w, b), x_MK, w, bias_EN)
            g_x, g_w, g_b = vjp(g_MN)
        return g_x, np.zeros(group_sizes_E.shape, jax.dtypes.float0), g_w, g_b

    f.defvjp(fwd, bwd)
    return f


_rowwise = _with_spec_gradient(_rowwise_forward)
_expert_loop = _with_spec_gradient(_expert_loop_forward)


def rowwise_matmul_xla(x_MK, group_sizes_E, w, bias_EN):
    """Same contract as `grouped_matmul_xla`, computed row by row: y[m] = W[e(m)] @ x[m] + bias[e(m)].

    For decode, where M = batch x experts per token is small: each row reads only its own expert's weights (an
    MXFP4 expert is never decoded into memory), one fused matrix-vector product pair per row (`_two_products`),
    straight from the [E, N, K/2] bytes. Rows past the groups are zero.
    """
    return _rowwise(x_MK, group_sizes_E, w, bias_EN)


def expert_loop_matmul_xla(x_MK, group_sizes_E, w, bias_EN):
    """Same contract as `grouped_matmul_xla`, organised for XLA:CPU prefill.

    A loop over experts decodes each expert that owns rows once (`decode_halves`; dense experts are split the
    same way), then multiplies its rows with two bf16 x bf16 -> f32 products (YNNPACK) over the even and the odd
    columns. The grouped matmul instead decodes one expert per (row tile, expert) work item and computes a whole
    128-row tile for every item.

    YNNPACK repacks the weight matrix on every call (a fixed ~3.5 ms for a 5760 x 1440 half, then ~0.075 ms a
    row), so each expert should see as few calls as possible: rows go in tiles of 1.3x the mean rows per expert
    (M / E) rounded up to 16, so most experts take one.
    """
    return _expert_loop(x_MK, group_sizes_E, w, bias_EN)
