"""Sampling settings and the one sampler every generation path uses.

Row b draws with `fold_in(key(seed_b), position_b)`, so its tokens depend only on its own settings, seed and
position: never on what else shares the batch, whether it came through `gj.generate` or the server.
"""

from __future__ import annotations

import dataclasses
import numbers

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 = greedy; top_p in (0, 1]; top_k 0 = off; the seed fixes every random draw."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self):
        if not (isinstance(self.temperature, numbers.Real) and self.temperature >= 0):
            raise ValueError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if not (isinstance(self.top_p, numbers.Real) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not (isinstance(self.top_k, numbers.Integral) and self.top_k >= 0):
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not (isinstance(self.seed, numbers.Integral) and self.seed >= 0):
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")


def sample(logits_BV, seed_B, position_B, temperature_B, top_p_B, top_k_B, mask_BV=None):
    """Next tokens [B] int32 from logits, each row with its own settings; `mask_BV` (bool, optional) marks the
    allowed tokens of constrained rows. Rows are drawn one at a time (`lax.map`) and a greedy row draws nothing:
    a draw over the 201,088-token vocabulary costs as much as a small model's whole step on CPU, so a lone
    sampled request must not pay it for every slot."""
    logits_BV = logits_BV.astype(jnp.float32)
    if mask_BV is not None:
        logits_BV = jnp.where(mask_BV, logits_BV, -jnp.inf)
    argmax = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    V = logits_BV.shape[-1]

    def truncate(logits_V, top_p, top_k):
        """Keep the top_k most likely tokens (0: all), then the smallest prefix of them reaching mass top_p."""
        sorted_V = -jnp.sort(-logits_V)
        kth = jnp.where(top_k > 0, sorted_V[jnp.clip(top_k, 1, V) - 1], -jnp.inf)
        logits_V = jnp.where(logits_V < kth, -jnp.inf, logits_V)
        sorted_V = jnp.where(sorted_V < kth, -jnp.inf, sorted_V)
        probs = jax.nn.softmax(sorted_V)
        keep = (jnp.cumsum(probs) - probs) < top_p  # the first token always
        cutoff = jnp.where(top_p < 1, jnp.min(jnp.where(keep, sorted_V, jnp.inf)), -jnp.inf)
        return jnp.where(logits_V >= cutoff, logits_V, -jnp.inf)

    def draw(args):
        logits_V, seed, position, temperature, top_p, top_k = args
        logits_V = logits_V / jnp.maximum(temperature, 1e-6)
        logits_V = jax.lax.cond((top_k > 0) | (top_p < 1), truncate, lambda x, *_: x, logits_V, top_p, top_k)
        key = jax.random.fold_in(jax.random.key(seed), position)
        return jax.random.categorical(key, logits_V).astype(jnp.int32)

    def row(args):
        return jax.lax.cond(args[3] > 0, draw, lambda a: jnp.int32(0), args)

    drawn = jax.lax.map(row, (logits_BV, seed_B, position_B, temperature_B, top_p_B, top_k_B))
    return jnp.where(temperature_B == 0, argmax, drawn)
