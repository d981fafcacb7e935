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
    - 2+ rows: `dot_general(bf16, bf16, preferred_element_type=f32)` runs as one YNNPACK bf16 kernel; every
      other form upcasts the matrix to f32 first (8 rows: 52-110 ms against 720-1950 ms).
    """
    lead, K = x.shape[:-1], x.shape[-1]
    rows = math.prod(lead)
    x_RK = x.reshape(rows, K)
    if _on_cpu() and rows == 1 and K <= _CPU_GEMV_MAX_K:
        y = x_RK.astype(jnp.float32) @ w_OI.astype(jnp.float32).T
    elif _on_cpu() and rows == 1:
        # XLA stops that rewrite at K = 4096 (the 20b's attention output projection): pad to 2 rows and take the
        # YNNPACK form (2.0 ms for 2880 x 4096, against 37 ms). Cutting K into pieces below 4096 instead is as fast
        # alone (2.5 ms) but slower inside the model, where XLA then copies the layer's weight slice out first.
        x_2K = jnp.concatenate([x_RK, jnp.zeros_like(x_RK)])
        y = jax.lax.dot_general(x_2K, w_OI, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)[:1]
    else:
        y = jax.lax.dot_general(x_RK, w_OI, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    if b_O is not None:
        y = y + b_O.astype(jnp.float32)
    return y.reshape(*lead, -1).astype(out_dtype or x.dtype)


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
