"""KV-cached batched generation: chunked prefill, one token per step, sampling, per-sequence stopping.

Prompts are right-padded; every row keeps its own positions and length, so a padded batch computes exactly what
each prompt computes alone. Shapes are bucketed (prefill chunk and cache length) so neither a new prompt length
nor a new token recompiles, and the cache buffers are donated to each step.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptoss_jax.kvcache import KVCache
from gptoss_jax.model import Transformer
from gptoss_jax.sharding import mesh_of

PREFILL_CHUNK = 512  # longest prefill chunk: bounds prefill memory for long prompts


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 = greedy; top_p in (0, 1]; top_k 0 = off; the seed fixes every random draw."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k}")


def sample(logits_BV, key_B, position_B, temperature, top_p, *, greedy: bool = False, top_k: int = 0,
           nucleus: bool = True):
    """Next tokens [B] from float32 logits. Row b draws with fold_in(key_b, position_b), so its tokens depend
    only on its seed and position, never on the rest of the batch. temperature 0 = greedy. `greedy` (temperature
    0 known in advance: no draw at all), `top_k` (0 = off) and `nucleus` (False skips the top-p sort when top_p is
    1) are static."""
    argmax = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    if greedy:
        return argmax
    logits = logits_BV / jnp.maximum(temperature, 1e-6)
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if nucleus:
        sorted_desc = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p  # the smallest prefix reaching top_p; first always
        cutoff = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
    keys = jax.vmap(jax.random.fold_in)(key_B, position_B)
    drawn = jax.vmap(jax.random.categorical)(keys, logits)
    return jnp.where(temperature == 0, argmax, drawn).astype(jnp.int32)


@functools.lru_cache(maxsize=8)
def _steps(graphdef):
    """The jitted prefill, first-token and decode steps of one model structure. Built once per graphdef and
    closed over it, so a step call does not hash the graphdef as a static argument (~2 ms a token)."""
    static = ("greedy", "top_k", "nucleus")

    @functools.partial(jax.jit, donate_argnums=1)
    def prefill_chunk(state, cache, tokens_BT, n_B, last_h_BD):
        """Extend the cache by one prompt chunk; keep each row's hidden state at its last real prompt token."""
        model = nnx.merge(graphdef, state)
        h_BTD, cache = model.extend(tokens_BT, cache, n_B)
        idx = jnp.clip(n_B - 1, 0, tokens_BT.shape[1] - 1)
        h_last = jnp.take_along_axis(h_BTD, idx[:, None, None], axis=1)[:, 0]
        return cache, jnp.where((n_B > 0)[:, None], h_last, last_h_BD)

    @functools.partial(jax.jit, static_argnames=static)
    def first_token(state, h_BD, key_B, position_B, temperature, top_p, **kw):
        model = nnx.merge(graphdef, state)
        return sample(model.logits(h_BD), key_B, position_B, temperature, top_p, **kw)

    @functools.partial(jax.jit, static_argnames=static, donate_argnums=1)
    def decode_step(state, cache, tokens_B, active_B, key_B, temperature, top_p, **kw):
        """Feed one token per active row; return the updated cache and the next token of every row."""
        model = nnx.merge(graphdef, state)
        h_B1D, cache = model.extend(tokens_B[:, None], cache, active_B.astype(jnp.int32))
        return cache, sample(model.logits(h_B1D[:, 0]), key_B, cache.lengths, temperature, top_p, **kw)

    return prefill_chunk, first_token, decode_step


def _bucket(n: int, lo: int, hi: int | None = None) -> int:
    """The power of two >= n (at least lo); past hi, the multiple of hi >= n."""
    if hi is not None and n > hi:
        return -(-n // hi) * hi
    return max(lo, 1 << (n - 1).bit_length())


def stream(model: Transformer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
           sampling: Sampling = Sampling(), stop_tokens: Sequence[int] = (),
           prefill_chunk: int = PREFILL_CHUNK) -> Iterator[list[int | None]]:
    """Yield, per decoding step, one new token per row (None for rows that have stopped)."""
    cfg = model.config
    prompts = _check_prompts(prompts, cfg.vocab_size)
    if not (isinstance(max_new_tokens, int) and max_new_tokens >= 1):
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    lengths = np.array([len(p) for p in prompts], np.int32)
    needed = int(lengths.max()) + max_new_tokens
    if needed > cfg.max_position_embeddings:
        raise ValueError(f"prompt ({int(lengths.max())} tokens) + max_new_tokens ({max_new_tokens}) = {needed} "
                         f"exceeds the model's context of {cfg.max_position_embeddings} tokens")
    B = len(prompts)
    graphdef, state = nnx.split(model)
    prefill_step, first_token, decode_step = _steps(graphdef)
    max_len = min(_bucket(needed, 128), cfg.max_position_embeddings)
    mesh = mesh_of(model)  # a sharded model decodes with a cache sharded over the same mesh
    cache = (KVCache.create(cfg, B, max_len, model.dtype) if mesh is None
             else KVCache.create_sharded(cfg, B, max_len, model.dtype, mesh))

    chunk = _bucket(int(lengths.max()), 16, prefill_chunk)
    chunk = min(chunk, prefill_chunk)
    padded = np.zeros((B, -(-int(lengths.max()) // chunk) * chunk), np.int32)
    for b, p in enumerate(prompts):
        padded[b, : len(p)] = p
    h = jnp.zeros((B, cfg.hidden_size), model.dtype)
    for c in range(0, padded.shape[1], chunk):
        n = np.clip(lengths - c, 0, chunk).astype(np.int32)
        cache, h = prefill_step(state, cache, jnp.asarray(padded[:, c : c + chunk]), jnp.asarray(n), h)

    key = jax.vmap(jax.random.key)(jnp.full((B,), sampling.seed, jnp.uint32))
    temperature, top_p = jnp.float32(sampling.temperature), jnp.float32(sampling.top_p)
    static = {"greedy": sampling.temperature == 0, "top_k": sampling.top_k, "nucleus": sampling.top_p < 1}
    tokens = first_token(state, h, key, cache.lengths, temperature, top_p, **static)
    stops = set(int(t) for t in stop_tokens)
    active = np.ones(B, bool)
    for step in range(max_new_tokens):
        host = np.asarray(tokens)
        yield [int(t) if a else None for t, a in zip(host, active)]
        active &= ~np.isin(host, list(stops))
        if step == max_new_tokens - 1 or not active.any():
            return
        cache, tokens = decode_step(state, cache, tokens, jnp.asarray(active), key, temperature, top_p, **static)


def generate(model: Transformer, prompt_tokens, max_new_tokens: int = 128, temperature: float = 1.0,
             top_p: float = 1.0, seed: int = 0, stop_tokens: Sequence[int] | None = None, top_k: int = 0,
             on_token: Callable[[list[int | None]], None] | None = None):
    """New tokens after each prompt (ending with the stop token if one was sampled).

    A list of ints returns a list of ints; a list of lists returns a list of lists. temperature=0 is greedy.
    `on_token`, if given, receives each step's tokens as they are produced (None for stopped rows).
    """
    single = len(prompt_tokens) > 0 and not isinstance(prompt_tokens[0], (list, tuple, np.ndarray))
    prompts = [prompt_tokens] if single else prompt_tokens
    outs: list[list[int]] = [[] for _ in prompts]
    sampling = Sampling(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    for step in stream(model, prompts, max_new_tokens=max_new_tokens, sampling=sampling,
                       stop_tokens=stop_tokens or ()):
        if on_token is not None:
            on_token(step)
        for out, t in zip(outs, step):
            if t is not None:
                out.append(t)
    return outs[0] if single else outs


def _check_prompts(prompts, vocab_size: int) -> list[list[int]]:
    if len(prompts) == 0:
        raise ValueError("no prompts given")
    out = []
    for b, p in enumerate(prompts):
        p = [int(t) for t in p]
        if not p:
            raise ValueError(f"prompt {b} is empty")
        bad = [t for t in p if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt {b} has token ids outside [0, {vocab_size}): {bad[:5]}")
        out.append(p)
    return out
