"""Causal attention with a per-head sink and an optional sliding window: the pure-XLA twin (the specification).

Shapes: B batch, T queries, S keys, K kv heads, G query heads per kv head, H head dim. Query head k*G + g reads
kv head k (grouped-query attention without repeating K/V).
"""

import jax
import jax.numpy as jnp


def band_mask(q_pos, k_pos, window: int) -> jax.Array:
    """[..., T, S] bool: key j is visible to query i iff 0 <= pos_j <= pos_i and (window == 0 or
    pos_i - pos_j < window). A negative key position marks an empty cache slot.

    So a window of 128 admits 128 keys, the query's own included (FlashAttention's (127, 0)).
    """
    diff = q_pos[..., :, None] - k_pos[..., None, :]
    visible = (diff >= 0) & (k_pos[..., None, :] >= 0)
    if window:
        visible &= diff < window
    return visible


def attention_xla(q_BTKGH, k_BSKH, v_BSKH, sinks_KG, *, window: int, sm_scale: float, q_pos_BT=None,
                  k_pos_BS=None, segment_ids_BT=None):
    """Softmax attention whose denominator also holds e^sink for each query head; output [B, T, K, G, H].

    Positions default to 0..T-1 and 0..S-1 (a whole-sequence forward); a KV cache passes its own, with -1 for
    empty slots. Scores, softmax and the sink are in float32; the sink is not scaled by `sm_scale`.
    `segment_ids_BT` (whole sequences only, S == T) keeps packed examples apart: a query sees only keys of its own
    segment.
    """
    B, T, S = q_BTKGH.shape[0], q_BTKGH.shape[1], k_BSKH.shape[1]
    q_pos_BT = jnp.broadcast_to(jnp.arange(T), (B, T)) if q_pos_BT is None else q_pos_BT
    k_pos_BS = jnp.broadcast_to(jnp.arange(S), (B, S)) if k_pos_BS is None else k_pos_BS
    s_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32) * sm_scale
    mask_BTS = band_mask(q_pos_BT, k_pos_BS, window)
    if segment_ids_BT is not None:
        mask_BTS &= segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
    mask_B11TS = mask_BTS[:, None, None]
    s_BKGTS = jnp.where(mask_B11TS, s_BKGTS, -jnp.inf)
    sink_KG11 = sinks_KG.astype(jnp.float32)[:, :, None, None]
    m = jnp.maximum(s_BKGTS.max(axis=-1, keepdims=True), sink_KG11)
    p_BKGTS = jnp.exp(s_BKGTS - m)
    denom = p_BKGTS.sum(axis=-1, keepdims=True) + jnp.exp(sink_KG11 - m)
    p_BKGTS = (p_BKGTS / denom).astype(v_BSKH.dtype)
    # p as the left operand: the product comes out [B, K, G, T, H], for one query (decode) already the order of
    # [B, T, K, G, H], so the output projection reads it without a transpose.
    out_BKGTH = jax.lax.dot_general(p_BKGTS, v_BSKH, (((4,), (1,)), ((0, 1), (0, 2))),
                                    preferred_element_type=jnp.float32)
    return out_BKGTH.transpose(0, 3, 1, 2, 4).astype(q_BTKGH.dtype)
