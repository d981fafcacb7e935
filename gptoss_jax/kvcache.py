"""The KV cache for batched decoding.

Full-attention layers keep K/V for every position up to the batch's maximum length (slot = position). Sliding
layers keep a ring of `sliding_window` slots (slot = position mod window), so their memory does not grow with
context. Each sequence has its own length: prompts are right-padded and every row keeps its true positions.

A chunk of new tokens (a prefill chunk, or one token per row when decoding) attends over the cache's slots plus
its own keys, each key carrying its position (-1 = empty); the cache is then updated with the chunk's real
tokens only, so padding never enters it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from gptoss_jax import ops
from gptoss_jax.config import ModelConfig
from gptoss_jax.sharding import logical_sharding


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    full_k: jax.Array  # [layers // 2, B, S, K, H]: odd (full-attention) layers
    full_v: jax.Array
    ring_k: jax.Array  # [(layers + 1) // 2, B, W, K, H]: even (sliding) layers
    ring_v: jax.Array
    lengths: jax.Array  # [B] int32: tokens cached per sequence

    @classmethod
    def create(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.bfloat16) -> KVCache:
        if max_len > cfg.max_position_embeddings:
            raise ValueError(f"a cache of {max_len} tokens exceeds the model's context of "
                             f"{cfg.max_position_embeddings}")
        K, H, L = cfg.num_key_value_heads, cfg.head_dim, cfg.num_hidden_layers
        W = cfg.sliding_window or max_len  # no window: "sliding" layers are full too
        full, ring = (L // 2, batch, max_len, K, H), ((L + 1) // 2, batch, W, K, H)
        # Four distinct buffers: each is donated to the step that updates it.
        return cls(jnp.zeros(full, dtype), jnp.zeros(full, dtype), jnp.zeros(ring, dtype), jnp.zeros(ring, dtype),
                   jnp.zeros((batch,), jnp.int32))

    @classmethod
    def create_sharded(cls, cfg: ModelConfig, batch: int, max_len: int, dtype, mesh) -> KVCache:
        """`create`, each buffer made already sharded over `mesh` (batch over data x fsdp, kv heads over tensor)."""
        shapes = jax.eval_shape(lambda: cls.create(cfg, batch, max_len, dtype))
        cache_axes = ("layers", "batch", "sequence", "kv_heads", "head_dim")
        shardings = cls(*(logical_sharding(cache_axes, getattr(shapes, f).shape, mesh)
                          for f in ("full_k", "full_v", "ring_k", "ring_v")),
                        logical_sharding(("batch",), (batch,), mesh))
        return jax.jit(lambda: cls.create(cfg, batch, max_len, dtype), out_shardings=shardings)()

    @property
    def max_len(self) -> int:
        return self.full_k.shape[2]

    def layers(self, window: int) -> tuple[jax.Array, jax.Array]:
        return (self.ring_k, self.ring_v) if window else (self.full_k, self.full_v)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Chunk:
    """Where a chunk of new tokens [B, T] goes: row b's tokens start at position start[b], the first n[b] are
    real (the rest is padding)."""

    start: jax.Array  # [B] int32
    n: jax.Array  # [B] int32

    def positions(self, T: int) -> jax.Array:
        return self.start[:, None] + jnp.arange(T)

    def key_positions(self, T: int) -> jax.Array:
        t = jnp.arange(T)
        return jnp.where(t < self.n[:, None], self.start[:, None] + t, -1)


def _slot_positions(lengths_B, slots: int, ring: bool) -> jax.Array:
    """[B, slots]: the position each slot holds after `lengths` tokens, or -1 if none."""
    s = jnp.arange(slots)
    if not ring:
        return jnp.where(s < lengths_B[:, None], s, -1)
    last = lengths_B[:, None] - 1  # the newest position with slot s is last - ((last - s) mod slots)
    pos = last - jnp.mod(last - s, slots)
    return jnp.where(pos >= 0, pos, -1)


def attend(layer_k, layer_v, q_BTKGH, k_BTKH, v_BTKH, sinks_KG, chunk: Chunk, *, window: int, sm_scale: float,
           ring: bool, kernels: str = "auto"):
    """Attention of a chunk over one layer's cache slots plus itself; returns (output, updated layer k, v)."""
    T, slots = q_BTKGH.shape[1], layer_k.shape[1]
    dtype = layer_k.dtype
    k_BTKH, v_BTKH = k_BTKH.astype(dtype), v_BTKH.astype(dtype)
    new_k, new_v = _write(layer_k, k_BTKH, chunk, ring), _write(layer_v, v_BTKH, chunk, ring)
    attend = dict(window=window, sm_scale=sm_scale, q_pos_BT=chunk.positions(T), kernels=kernels)
    if not ring or T == 1:
        # The updated cache holds every key the chunk needs (a ring slot a decode step overwrites held a position
        # outside the window), so attend over it alone: no copy of the cache per layer per step.
        k_pos = _slot_positions(chunk.start + chunk.n, slots, ring)
        return ops.attention(q_BTKGH, new_k, new_v, sinks_KG, k_pos_BS=k_pos, **attend), new_k, new_v
    # A longer chunk would overwrite ring slots its own earlier queries still read: attend over the old slots
    # plus the chunk's keys.
    keys = jnp.concatenate([layer_k, k_BTKH], axis=1)
    values = jnp.concatenate([layer_v, v_BTKH], axis=1)
    k_pos = jnp.concatenate([_slot_positions(chunk.start, slots, ring), chunk.key_positions(T)], axis=1)
    return ops.attention(q_BTKGH, keys, values, sinks_KG, k_pos_BS=k_pos, **attend), new_k, new_v


def _write(layer_BSKH, new_BTKH, chunk: Chunk, ring: bool):
    B, slots = layer_BSKH.shape[:2]
    T = new_BTKH.shape[1]
    if not ring:  # slot = position; padding and positions past the cache are dropped
        pos = jnp.where(jnp.arange(T) < chunk.n[:, None], chunk.positions(T), slots)
        return layer_BSKH.at[jnp.arange(B)[:, None], pos].set(new_BTKH, mode="drop")
    # Ring: after the chunk, slot s holds position p(s) (its newest); take it from the chunk when p(s) is new.
    pos_BS = _slot_positions(chunk.start + chunk.n, slots, ring=True)
    from_chunk = pos_BS >= chunk.start[:, None]
    idx = jnp.clip(pos_BS - chunk.start[:, None], 0, T - 1)
    gathered = jnp.take_along_axis(new_BTKH, idx[:, :, None, None], axis=1)
    return jnp.where(from_chunk[:, :, None, None], gathered, layer_BSKH)
