"""Grouped matmul for the MoE experts: the pure-XLA twin (the specification).

Rows of `x_MK` are sorted by expert; `group_sizes_E` says how many belong to each (empty groups allowed, rows past
their sum are zero). Expert weights are `Packed` MXFP4 [E, N, K/32, 16] + [E, N, K/32] or dense [E, N, K], both in
the checkpoint's (out, in) orientation. Only the experts that own rows are ever dequantized, one at a time.
"""

import jax
import jax.numpy as jnp

from gptoss_kernels.mxfp4 import Packed, dequantize


def expert_matrix(w, e, dtype) -> jax.Array:
    """Expert `e`'s [N, K] matrix in `dtype` (dequantized when packed)."""
    if isinstance(w, Packed):
        return dequantize(w.blocks[e], w.scales[e], dtype)
    return w[e].astype(dtype)


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

    group_sizes_E = group_sizes_E.astype(jnp.int32)
    ends_E = jnp.cumsum(group_sizes_E)
    starts_E = ends_E - group_sizes_E
    first_tile_E = starts_E // tm
    tiles_E = jnp.where(group_sizes_E > 0, (ends_E - 1) // tm - first_tile_E + 1, 0)
    item_ends_E = jnp.cumsum(tiles_E)
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
