"""The jitted steps of inference, one set for `gj.generate` and the server: prefill a chunk of prompt tokens into
some of the cache's slots, and decode one token in every busy slot. Both sample with `sampling.sample`."""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptoss_jax.engine.sampling import sample

PREFILL_CHUNK = 512  # longest prefill chunk: bounds prefill memory for long prompts


def bucket(n: int, lo: int, hi: int | None = None) -> int:
    """The power of two >= n (at least lo); past hi, the multiple of hi >= n. Shapes are bucketed so that neither
    a new prompt length nor a new batch size recompiles."""
    if hi is not None and n > hi:
        return -(-n // hi) * hi
    return max(lo, 1 << (n - 1).bit_length())


def prefill_chunks(lengths: np.ndarray, prefill_chunk: int) -> tuple[int, int]:
    """(chunk, width): prompts of these lengths are prefilled in chunks of `chunk` tokens (a power of two, at most
    `prefill_chunk`), right-padded to `width` tokens."""
    longest = int(np.max(lengths))
    chunk = min(bucket(longest, 32, prefill_chunk), prefill_chunk)
    return chunk, -(-longest // chunk) * chunk


class Steps(NamedTuple):
    prefill: callable
    first_token: callable
    decode: callable


def _rows(a, rows_R):
    """Gather cache rows (batch axis 1 for [layers, B, ...], 0 for lengths); rows past the end read zeros."""
    return jnp.take(a, rows_R, axis=0 if a.ndim == 1 else 1, mode="fill", fill_value=0)


def _put_rows(a, rows_R, sub):
    return a.at[rows_R].set(sub, mode="drop") if a.ndim == 1 else a.at[:, rows_R].set(sub, mode="drop")


def _first(a, B):
    return a[:B] if a.ndim == 1 else a[:, :B]


def _put_first(a, sub):
    return a.at[: sub.shape[0]].set(sub) if a.ndim == 1 else a.at[:, : sub.shape[1]].set(sub)


@functools.lru_cache(maxsize=8)
def steps(graphdef) -> Steps:
    """The steps of one model structure. Built once per graphdef and closed over it, so a step call does not hash
    the graphdef as a static argument (~2 ms a token)."""

    @functools.partial(jax.jit, donate_argnums=1, static_argnames="every_row")
    def prefill(state, cache, rows_R, fresh_R, tokens_RT, n_R, last_h_RD, *, every_row=False):
        """Extend slots `rows_R` by one prompt chunk (their first n_R tokens; a fresh row starts from length 0);
        keep each row's hidden state at its last real token. Rows past the cache (padding) are dropped.
        `every_row`: the rows are all the cache's, in order, so none is gathered or scattered (no copy)."""
        model = nnx.merge(graphdef, state)
        sub = cache if every_row else jax.tree_util.tree_map(lambda a: _rows(a, rows_R), cache)
        sub = dataclasses.replace(sub, lengths=jnp.where(fresh_R, 0, sub.lengths))
        h_RTD, sub = model.extend(tokens_RT, sub, n_R)
        idx = jnp.clip(n_R - 1, 0, tokens_RT.shape[1] - 1)
        h_last = jnp.take_along_axis(h_RTD, idx[:, None, None], axis=1)[:, 0]
        if not every_row:
            sub = jax.tree_util.tree_map(lambda a, s: _put_rows(a, rows_R, s), cache, sub)
        return sub, jnp.where((n_R > 0)[:, None], h_last, last_h_RD)

    @jax.jit
    def first_token(state, h_RD, seed_R, position_R, temperature_R, top_p_R, top_k_R, mask_RV):
        model = nnx.merge(graphdef, state)
        return sample(model.logits(h_RD), seed_R, position_R, temperature_R, top_p_R, top_k_R, mask_RV)

    @functools.partial(jax.jit, donate_argnums=1)
    def decode(state, cache, tokens_B, active_B, seed_B, temperature_B, top_p_B, top_k_B, mask_BV):
        """Feed one token per active slot; return the cache and every slot's next token. The inputs may cover only
        the first B slots of the cache (the others are left alone: fewer rows, a cheaper step)."""
        model = nnx.merge(graphdef, state)
        sub = jax.tree_util.tree_map(lambda a: _first(a, tokens_B.shape[0]), cache)
        h_B1D, sub = model.extend(tokens_B[:, None], sub, active_B.astype(jnp.int32))
        tokens = sample(model.logits(h_B1D[:, 0]), seed_B, sub.lengths, temperature_B, top_p_B, top_k_B, mask_BV)
        return jax.tree_util.tree_map(_put_first, cache, sub), tokens

    return Steps(prefill, first_token, decode)
