"""How the model's products and its layer loop are written for the platform a program is compiled for.

`ops.forms(x)` picks one object per platform, made once: the plain `Forms` (TPU, GPU and any platform without
forms of its own: the specification's expressions) or `CPUForms`. On XLA:CPU the form of a product decides its
speed by up to 10-30x, and a rolled loop over the stacked layers costs a float32 copy of every weight
(docs/cpu_performance.md has the measured tables); these forms are chosen by shape, at trace time. Every form
computes the same float32 accumulation of exact products; only the summation order differs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gptoss_kernels.moe import expert_loop_matmul_xla, grouped_matmul_xla, rowwise_matmul_xla

# XLA:CPU rewrites a matrix-vector dot into one loop fusion that reads the matrix once, on both cores, with any
# elementwise producer (a bf16 -> f32 convert, an MXFP4 decode) fused in, but only while the contracted length
# is below this; from 4096 on it falls back to a generic dot that first materializes an f32 copy of the matrix.
GEMV_MAX_K = 4095
# Expert matmuls on CPU: up to this many rows (decode: batch x experts per token) run row by row, each reading
# only its own expert's bytes; above it (prefill) a loop over experts decodes each routed expert once.
ROWWISE_MAX_ROWS = 64


def _index(a, j):
    """Layer j of a stacked array: a static slice for a Python int, a dynamic one for a traced index."""
    return a[j] if isinstance(j, int) else jax.lax.dynamic_index_in_dim(a, j, keepdims=False)


class Layers:
    """The stacked blocks' state (every leaf [L, ...]) as the layer loop reads it: `take(j)` is layer j's
    state, `scan(pair, carry, n)` runs `pair(carry, idx)` for idx = 0 .. n-1. The plain form is `jax.lax.scan`
    with each layer's weights indexed out of the stacks in place (no slice per pair). The stacks are closed
    over, not scanned as operands: reshaped into pairs, TPU's compiler copied every stacked weight whose minor
    dimension is not 128-aligned (2880) once per call."""

    def __init__(self, state, restore=lambda tree: tree, unroll: bool = False):
        self.state, self.restore, self.unroll = state, restore, unroll

    def take(self, j):
        return self.restore(jax.tree.map(lambda a: _index(a, j), self.state))

    def scan(self, pair, carry, n: int):
        if self.unroll:
            for idx in range(n):
                carry, _ = pair(carry, idx)
        elif n:
            carry, _ = jax.lax.scan(pair, carry, jnp.arange(n))
        return carry


class Forms:
    """The plain forms: TPU, GPU and any platform without forms of its own."""

    def matmul(self, x_RK, w_OI):
        """x @ w.T for w stored (out, in); float32 [R, O]."""
        return jax.lax.dot_general(x_RK, w_OI, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)

    def expert_matmul(self, x_MK, group_sizes_E, w, bias_EN):
        """The grouped matmul's XLA twin (`gptoss_kernels.moe.grouped_matmul_xla`: the specification)."""
        return grouped_matmul_xla(x_MK, group_sizes_E, w, bias_EN)

    def layers(self, state, x_BTD, *, cached: bool) -> Layers:
        """The layer loop for `x_BTD` through the stacked blocks' `state`, over a KV cache when `cached`."""
        return Layers(state)


class CPUForms(Forms):
    """XLA:CPU's forms (docs/cpu_performance.md sections 1-4)."""

    def matmul(self, x_RK, w_OI):
        """The fast form of a bf16 product depends on the number of rows (measured on the 201088 x 2880
        unembedding, 2 cores):
        - 1 row: `f32(x) @ f32(w).T` becomes a fused matrix-vector loop (47 ms, ~25 GB/s); the same product as
          `dot_general(..., preferred_element_type=f32)` upcasts the whole matrix first (1470 ms).
          XLA makes that rewrite only while K < 4096, so longer rows are cut into pieces.
        - 2+ rows: `dot_general(bf16, bf16, preferred_element_type=f32)` runs as one YNNPACK bf16 kernel; every
          other form upcasts the matrix to f32 first (8 rows: 52-110 ms against 720-1950 ms).
        """
        rows, K = x_RK.shape
        pieces = -(-K // GEMV_MAX_K)
        if rows > 1:
            return super().matmul(x_RK, w_OI)
        if K % pieces:  # no even cut: pad to 2 rows and take the YNNPACK form
            return super().matmul(jnp.concatenate([x_RK, jnp.zeros_like(x_RK)]), w_OI)[:1]
        if pieces == 1:
            return x_RK.astype(jnp.float32) @ w_OI.astype(jnp.float32).T
        # XLA stops the rewrite at K = 4096 (the 20b's attention output projection): cut K into pieces below it
        # (2880 x 4096 in the model: 2.3 ms, against 7-10 ms padded to 2 rows for YNNPACK, which copies the layer's
        # weight out first, and 37 ms as is). Materialize the vector as one row first (XLA never fuses a reduction
        # into its consumer): fused, each piece would recompute it from its producer's shape, e.g. the attention
        # output's [K, G, H], with index arithmetic per element (5.2 ms for a 2880 x 2048 piece, against 1.1 ms).
        x_RK = jnp.max(jnp.stack([x_RK, x_RK]), axis=0)
        parts = [x_p.astype(jnp.float32) @ w_p.astype(jnp.float32).T
                 for x_p, w_p in zip(jnp.split(x_RK, pieces, axis=1), jnp.split(w_OI, pieces, axis=1))]
        # The sum goes behind a barrier: fused into the last product, it costs that product the rewrite.
        return sum(jax.lax.optimization_barrier(parts))

    def expert_matmul(self, x_MK, group_sizes_E, w, bias_EN):
        """At the 20b's widths (mlp1, 2 cores):
        - decode-sized calls (M <= ROWWISE_MAX_ROWS) run row by row, each row fused matrix-vector products over
          its own expert's weights (`rowwise_matmul_xla`): 4 rows (batch 1) 5 ms against 224 ms for the grouped
          matmul, which scans all (row tile, expert) work items and decodes a whole expert for each;
        - larger calls (prefill) decode each routed expert once and multiply all of its rows
          (`expert_loop_matmul_xla`): 256 rows 0.45 s against 2.1 s.
        Both treat dense experts exactly as packed ones (bit-identical results) and differentiate as the
        specification does.
        """
        K = x_MK.shape[1] // 2  # both forms contract the even and the odd columns apart
        if x_MK.shape[0] <= ROWWISE_MAX_ROWS and K <= GEMV_MAX_K:
            return rowwise_matmul_xla(x_MK, group_sizes_E, w, bias_EN)
        return expert_loop_matmul_xla(x_MK, group_sizes_E, w, bias_EN)

    def layers(self, state, x_BTD, *, cached: bool) -> Layers:
        """Inference over a cache reads the stacked weights through their bit patterns: inside a rolled loop
        XLA:CPU slices bf16 through float32 and hoists that convert out, converting all layers' weights to a
        float32 copy on every call (2x the bf16 weights in extra memory; for the 20b's 2880 x 4096 attention
        output projection 19 ms a layer against 2 ms). bf16 leaves become their uint16 bit patterns, which XLA
        neither converts nor hoists, and each layer's slice is bitcast back.

        - Decode steps (one token per row) run the layers as straight-line code, each weight sliced statically
          and read in place by its product (inside the jitted step a bitcast of a stacked weight that crosses a
          loop is a copy: 1 GB of mlp1 codes a step): 4 layers at the 20b's widths decode in 106 ms a token
          instead of 960. The price is compile time that grows with depth, for the decode step on CPU only.
        - Prefill keeps the scan, its operands crossing the loop as uint16 (one copy per call at their own width:
          1.3 GB for the 20b, instead of a 2.6 GB float32 copy). Unrolled, its expert loops take each layer's
          experts as loop operands, which XLA copies out of the stacked weights, all layers' at once (the 20b
          then needs 24 GB).
        - The full forward (training, parity) keeps the plain scan: a bitcast to integers has no gradient.
        """
        if not cached:
            return super().layers(state, x_BTD, cached=cached)
        dtypes = jax.tree.map(lambda a: a.dtype, state)
        bits = jax.tree.map(lambda a: jax.lax.bitcast_convert_type(a, jnp.uint16) if a.dtype == jnp.bfloat16 else a,
                            state)
        restore = lambda tree: jax.tree.map(  # noqa: E731
            lambda a, dtype: a if a.dtype == dtype else jax.lax.bitcast_convert_type(a, dtype), tree, dtypes)
        return Layers(bits, restore, unroll=x_BTD.shape[1] == 1)
