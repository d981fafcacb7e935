"""The switch points for performance-critical ops: the model calls only these.

Each routes to the pure-XLA twin in `gptoss_kernels`; the Pallas kernels (TPU/GPU) plug in here behind the same
signatures, chosen per backend, so the model never changes when a kernel lands.

On XLA:CPU the form of a product decides its speed by up to 10-30x (docs/cpu_performance.md has the measured
tables), so the CPU forms are chosen here, by shape, at trace time. Every form computes the same float32
accumulation of exact products; only the summation order differs.
"""

import math

import jax
import jax.numpy as jnp

from gptoss_kernels.attention import attention_xla
from gptoss_kernels.moe import expert_loop_matmul_xla, grouped_matmul_xla, rowwise_matmul_xla

# XLA:CPU rewrites a matrix-vector dot into one loop fusion that reads the matrix once, on both cores, with any
# elementwise producer (a bf16 -> f32 convert, an MXFP4 decode) fused in, but only while the contracted length
# is below this; from 4096 on it falls back to a generic dot that first materializes an f32 copy of the matrix.
_CPU_GEMV_MAX_K = 4095
# grouped_matmul: up to this many rows (decode: batch x experts per token) run row by row, each reading only its
# own expert's bytes; above it (prefill) a loop over experts decodes each routed expert once for all its rows.
ROWWISE_MAX_ROWS = 64


def _on_cpu() -> bool:
    return jax.default_backend() == "cpu"


def linear(x, w_OI, b_O=None, out_dtype=None):
    """x @ w.T (+ b) with w stored (out, in) as in both checkpoint layouts; accumulates in float32.

    Keep every big dense product here: on XLA:CPU the fast form of a bf16 product depends on the number of rows
    (measured on the 201088 x 2880 unembedding, 2 cores; docs/cpu_performance.md):
    - 1 row: `f32(x) @ f32(w).T` becomes a fused matrix-vector loop (47 ms, ~25 GB/s); the same product as
      `dot_general(..., preferred_element_type=f32)` upcasts the whole matrix first (1470 ms).
      XLA makes that rewrite only while K < 4096, so longer rows are cut into pieces.
    - 2+ rows: `dot_general(bf16, bf16, preferred_element_type=f32)` runs as one YNNPACK bf16 kernel; every
      other form upcasts the matrix to f32 first (8 rows: 52-110 ms against 720-1950 ms).
    """
    lead, K = x.shape[:-1], x.shape[-1]
    rows = math.prod(lead)
    x_RK = x.reshape(rows, K)
    pieces = -(-K // _CPU_GEMV_MAX_K)
    if _on_cpu() and rows == 1 and K % pieces == 0:
        # XLA stops that rewrite at K = 4096 (the 20b's attention output projection): cut K into pieces below it
        # (2880 x 4096 in the model: 2.3 ms, against 7-10 ms padded to 2 rows for YNNPACK, which copies the layer's
        # weight out first, and 37 ms as is). Their sum goes behind a barrier: fused into the last product, it
        # costs that product the rewrite.
        if pieces > 1:
            # Materialize the vector as one row first (XLA never fuses a reduction into its consumer): fused, each
            # piece would recompute it from its producer's shape, e.g. the attention output's [K, G, H], with index
            # arithmetic per element (5.2 ms for a 2880 x 2048 piece, against 1.1 ms).
            x_RK = jnp.max(jnp.stack([x_RK, x_RK]), axis=0)
        parts = [x_p.astype(jnp.float32) @ w_p.astype(jnp.float32).T
                 for x_p, w_p in zip(jnp.split(x_RK, pieces, axis=1), jnp.split(w_OI, pieces, axis=1))]
        y = sum(jax.lax.optimization_barrier(parts)) if pieces > 1 else parts[0]
    else:
        if _on_cpu() and rows == 1:  # no even cut: pad to 2 rows and take the YNNPACK form
            x_RK = jnp.concatenate([x_RK, jnp.zeros_like(x_RK)])
        dims = (((1,), (1,)), ((), ()))
        y = jax.lax.dot_general(x_RK, w_OI, dims, preferred_element_type=jnp.float32)[:rows]
    if b_O is not None:
        y = y + b_O.astype(jnp.float32)
    return y.reshape(*lead, -1).astype(out_dtype or x.dtype)


def unroll_layers() -> bool:
    """Whether KV-cached inference runs the layers as straight-line code instead of under a scan: on XLA:CPU.

    XLA:CPU slices bf16 arrays through float32, and inside a loop it hoists that convert out: a scan over the
    stacked layers converted all layers' weights to a float32 copy on every call (2x the bf16 weights in extra
    memory; for the 20b's 2880 x 4096 attention output projection 19 ms a layer against 2 ms). Bitcasting the
    weights to same-width integers around the loop stops the hoisting but makes XLA copy every stacked weight per
    call. Indexed one layer at a time (`layer_slice`), each weight is read in place by its product: 4 layers at the
    20b's widths decode in 106 ms a token instead of 960. The price is compile time that grows with depth, on CPU
    inference only; the full forward (training, parity) keeps the scan.
    """
    return _on_cpu()


def layer_slice(stacked, i: int):
    """Layer i of a stacked weight, for the unrolled layers. A bf16 array is sliced as its uint16 bit pattern:
    XLA:CPU slices bf16 through float32, which makes a slice read by two products a materialized copy."""
    if stacked.dtype != jnp.bfloat16:
        return stacked[i]
    return jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(stacked, jnp.uint16)[i], jnp.bfloat16)


def attention(q_BTKGH, k_BSKH, v_BSKH, sinks_KG, *, window: int, sm_scale: float, q_pos_BT=None, k_pos_BS=None):
    """Causal attention with sinks and an optional sliding window; [B, T, K, G, H].

    Without positions: a whole sequence from position 0. With them: queries against a KV cache's slots, whose
    position is -1 when empty.
    """
    return attention_xla(q_BTKGH, k_BSKH, v_BSKH, sinks_KG, window=window, sm_scale=sm_scale, q_pos_BT=q_pos_BT,
                         k_pos_BS=k_pos_BS)


def grouped_matmul(x_MK, group_sizes_E, w, bias_EN):
    """Expert-sorted rows times their experts' (MXFP4-packed or dense) weights, plus bias; float32 [M, N].

    On CPU (20b widths, mlp1, 2 cores; docs/cpu_performance.md):
    - decode-sized calls (M <= ROWWISE_MAX_ROWS) run row by row, each row fused matrix-vector products over its
      own expert's weights (`rowwise_matmul_xla`): 4 rows (batch 1) 8.6 ms against 224 ms for the grouped
      matmul, which scans all (row tile, expert) work items and decodes a whole expert for each;
    - larger calls (prefill) decode each routed expert once and multiply all of its rows
      (`expert_loop_matmul_xla`): 256 rows 0.45 s against 2.1 s.
    Both treat dense experts exactly as packed ones (bit-identical results) and differentiate as the
    specification does.
    """
    if _on_cpu():
        K = x_MK.shape[1] // 2  # both CPU forms contract the even and the odd columns apart
        if x_MK.shape[0] <= ROWWISE_MAX_ROWS and K <= _CPU_GEMV_MAX_K:
            # With rows for at least half the experts, copying the layer's experts out once (so that every row
            # reads contiguous bytes) beats reading them through their [N, K/32, 16] shape (config a, batch 8:
            # 55 ms a decode step against 120 ms).
            scan = 2 * x_MK.shape[0] >= bias_EN.shape[0]
            return rowwise_matmul_xla(x_MK, group_sizes_E, w, bias_EN, scan_rows=scan)
        return expert_loop_matmul_xla(x_MK, group_sizes_E, w, bias_EN)
    return grouped_matmul_xla(x_MK, group_sizes_E, w, bias_EN)
