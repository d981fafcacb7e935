"""Causal attention with a per-head sink and an optional sliding window: the pure-XLA twin (the specification).

Shapes: B batch, T queries, S keys, K kv heads, G query heads per kv head, H head dim. Query head k*G + g reads
kv head k (grouped-query attention without repeating K/V).
"""

import jax
import jax.numpy as jnp


def band_mask(q_pos_T: jax.Array, k_pos_S: jax.Array, window: int) -> jax.Array:
    """[T, S] bool: key j is visible to query i iff j <= i and (window == 0 or i - j < window).

    So a window of 128 admits 128 keys, the query's own included (FlashAttention's (127, 0)).
    """
    diff = q_pos_T[:, None] - k_pos_S[None, :]
    visible = diff >= 0
    if window:
        visible &= diff < window
    return visible


def attention_xla(q_BTKGH, k_BSKH, v_BSKH, sinks_KG, *, window: int, sm_scale: float):
    """Softmax attention whose denominator also holds e^sink for each query head; output [B, T, K, G, H].

    Queries and keys both start at position 0 (a whole-sequence forward). Scores, softmax and the sink are in
    float32; the sink is not scaled by `sm_scale`.
    """
    T, S = q_BTKGH.shape[1], k_BSKH.shape[1]
    s_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32) * sm_scale
    mask_TS = band_mask(jnp.arange(T), jnp.arange(S), window)
    s_BKGTS = jnp.where(mask_TS, s_BKGTS, -jnp.inf)
    sink_KG11 = sinks_KG.astype(jnp.float32)[:, :, None, None]
    m = jnp.maximum(s_BKGTS.max(axis=-1, keepdims=True), sink_KG11)
    p_BKGTS = jnp.exp(s_BKGTS - m)
    denom = p_BKGTS.sum(axis=-1, keepdims=True) + jnp.exp(sink_KG11 - m)
    p_BKGTS = (p_BKGTS / denom).astype(v_BSKH.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", p_BKGTS, v_BSKH, preferred_element_type=jnp.float32)
    return out.astype(q_BTKGH.dtype)
