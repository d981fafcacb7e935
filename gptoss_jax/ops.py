"""The switch points for performance-critical ops: the model calls only these.

Each routes to the pure-XLA twin in `gptoss_kernels`; the Pallas kernels (TPU/GPU) plug in here behind the same
signatures, chosen per backend, so the model never changes when a kernel lands.
"""

import jax
import jax.numpy as jnp

from gptoss_kernels.attention import attention_xla
from gptoss_kernels.moe import grouped_matmul_xla


def linear(x, w_OI, b_O=None, out_dtype=None):
    """x @ w.T (+ b) with w stored (out, in) as in both checkpoint layouts; accumulates in float32.

    Keep every big dense product here: on XLA:CPU the fast form of a bf16 matrix-vector product depends on the
    dot's form and the batch (10x cliffs; see "Performance notes" in the README), so this is the one place that
    chooses it.
    """
    y = jax.lax.dot_general(x, w_OI, (((x.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    if b_O is not None:
        y = y + b_O.astype(jnp.float32)
    return y.astype(out_dtype or x.dtype)


def attention(q_BTKGH, k_BSKH, v_BSKH, sinks_KG, *, window: int, sm_scale: float, q_pos_BT=None, k_pos_BS=None):
    """Causal attention with sinks and an optional sliding window; [B, T, K, G, H].

    Without positions: a whole sequence from position 0. With them: queries against a KV cache's slots, whose
    position is -1 when empty.
    """
    return attention_xla(q_BTKGH, k_BSKH, v_BSKH, sinks_KG, window=window, sm_scale=sm_scale, q_pos_BT=q_pos_BT,
                         k_pos_BS=k_pos_BS)


def grouped_matmul(x_MK, group_sizes_E, w, bias_EN):
    """Expert-sorted rows times their experts' (MXFP4-packed or dense) weights, plus bias; float32 [M, N]."""
    return grouped_matmul_xla(x_MK, group_sizes_E, w, bias_EN)
