"""The continuous-batching engine: one loop serves every request in a shared decode batch of fixed slots.

The KV cache has `max_batch` rows (slots) of `max_seq_len` tokens. A request waits in a bounded queue until a slot
is free; it is then prefilled into its slot (the new requests of one loop iteration are prefilled together: their
rows are gathered out of the cache, extended chunk by chunk, and scattered back, so the other slots are neither
touched nor recomputed) and joins the shared decode step, where every active slot advances by one token. Each
request samples with its own seed, temperature and top_p: row b draws with `fold_in(key(seed_b), position_b)`
exactly as `gptoss_jax.generate.sample` does, so a request gets the same tokens whatever else shares the batch,
and the same tokens as `gj.generate` with the same seed (token-identical in float32; see docs/server.md).

A request can carry a `Constraint` (constrained decoding: JSON output, scripted tokens in tests): before each of
its tokens the engine asks it for the allowed tokens, and the others' logits are set to -inf before sampling.

The loop runs in one background thread; tokens are handed to each request's callback as soon as a step produces
them. `cancel()` (a client that disconnected) frees the slot before the next step. Errors in a step fail the
requests in that step and never stop the loop.

A model sharded over a mesh (`load_model(..., mesh=...)`, `serve --mesh`) gets a KV cache sharded over the same
mesh (slots over data x fsdp, kv heads over tensor), as `gj.generate` does. In a multi-process job process 0 runs
the loop (and the HTTP server); every device operation it runs (prefill, decode, a fresh cache) is first sent to
the other processes (`distributed.Channel`), which run the same operation on their devices' shards in `follow()`.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptoss_jax import distributed
from gptoss_jax.generate import PREFILL_CHUNK, _bucket
from gptoss_jax.kvcache import KVCache
from gptoss_jax.model import Transformer
from gptoss_jax.sharding import mesh_of

log = logging.getLogger("gptoss_jax.server")

FinishCallback = Callable[[str | None, str | None], None]


class QueueFull(RuntimeError):
    """The engine's waiting queue is full: try again later (HTTP 503 with Retry-After)."""


class EngineStopped(RuntimeError):
    """The engine was shut down."""


class Constraint(Protocol):
    """Per-request token constraint, consulted in the engine thread before each sampled token."""

    def allowed(self) -> np.ndarray | None:
        """bool [vocab]: the tokens allowed next, or None for no constraint."""

    def advance(self, token: int) -> None:
        """The token that was sampled."""


class ForcedTokens:
    """A constraint that forces a fixed token sequence, then leaves the model free (or ends: the sequence usually
    ends with a stop token). Used by tests to make a random model emit known Harmony (a tool call)."""

    def __init__(self, tokens: Sequence[int], vocab_size: int):
        self.tokens = [int(t) for t in tokens]
        self.vocab_size = vocab_size
        self.i = 0

    def allowed(self) -> np.ndarray | None:
        if self.i >= len(self.tokens):
            return None
        mask = np.zeros(self.vocab_size, bool)
        mask[self.tokens[self.i]] = True
        return mask

    def advance(self, token: int) -> None:
        self.i += 1


@dataclasses.dataclass
class GenRequest:
    """One generation. `on_token(token)` is called (from the engine thread) for every sampled token, in order;
    `on_finish(reason, error)` once at the end: reason "stop" (a stop token was sampled; it was passed to
    on_token), "length" (max_tokens), "cancelled", or None with an error message."""

    prompt: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    stop_tokens: tuple[int, ...] = ()
    constraint: Constraint | None = None
    on_token: Callable[[int], None] | None = None
    on_finish: FinishCallback | None = None
    # engine-owned state
    id: int = -1
    fed: int = 0  # prompt tokens in the cache
    tokens: list[int] = dataclasses.field(default_factory=list)
    cancelled: bool = False
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None
    submitted_at: float = 0.0
    first_token_at: float | None = None
    done: threading.Event = dataclasses.field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Stop generating; the slot is freed before the engine's next step."""
        self.cancelled = True


def sample_rows(logits_BV, seed_B, position_B, temperature_B, top_p_B, mask_BV):
    """`gptoss_jax.generate.sample` with per-row temperature and top_p (top_k off) and a per-row mask of allowed
    tokens. Row b draws with fold_in(key(seed_b), position_b), so where its mask is all True it gets what
    `sample` gives with its values. Rows are drawn one at a time (`lax.map`) and a greedy row (temperature 0, or
    a slot that is free or mid-prompt) draws nothing: a draw over the 201,088-token vocabulary costs as much as a
    small model's whole step on CPU, so a lone request must not pay it for 16 slots."""
    logits_BV = jnp.where(mask_BV, logits_BV, -jnp.inf)
    argmax = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)

    def draw(args):
        logits_V, seed, position, temperature, top_p = args
        logits = logits_V / jnp.maximum(temperature, 1e-6)

        def nucleus(logits):
            sorted_desc = -jnp.sort(-logits)
            probs = jax.nn.softmax(sorted_desc)
            keep = (jnp.cumsum(probs) - probs) < top_p  # the smallest prefix reaching top_p; first always
            cutoff = jnp.min(jnp.where(keep, sorted_desc, jnp.inf))
            return jnp.where(logits >= cutoff, logits, -jnp.inf)

        logits = jax.lax.cond(top_p < 1, nucleus, lambda x: x, logits)
        key = jax.random.fold_in(jax.random.key(seed), position)
        return jax.random.categorical(key, logits).astype(jnp.int32)

    def row(args):
        return jax.lax.cond(args[3] > 0, draw, lambda a: jnp.int32(0), args)

    drawn = jax.lax.map(row, (logits_BV, seed_B, position_B, temperature_B, top_p_B))
    return jnp.where(temperature_B == 0, argmax, drawn)


def _rows(a, rows_R):
    """Gather cache rows (batch axis 1 for [layers, B, ...], 0 for lengths); rows past the end read zeros."""
    axis = 0 if a.ndim == 1 else 1
    return jnp.take(a, rows_R, axis=axis, mode="fill", fill_value=0)


def _put_rows(a, rows_R, sub):
    if a.ndim == 1:
        return a.at[rows_R].set(sub, mode="drop")
    return a.at[:, rows_R].set(sub, mode="drop")


@functools.lru_cache(maxsize=8)
def engine_steps(graphdef):
    """Jitted steps of the slot engine for one model structure: prefill rows, first token, decode."""

    @functools.partial(jax.jit, donate_argnums=1)
    def prefill_rows(state, cache, rows_R, fresh_R, tokens_RT, n_R, last_h_RD):
        """Extend slots `rows_R` by one prompt chunk (their first n_R tokens; a fresh row starts from length 0);
        keep each row's hidden state at its last real token. Rows past the cache (padding) are dropped."""
        model = nnx.merge(graphdef, state)
        sub = jax.tree_util.tree_map(lambda a: _rows(a, rows_R), cache)
        sub = dataclasses.replace(sub, lengths=jnp.where(fresh_R, 0, sub.lengths))
        h_RTD, sub = model.extend(tokens_RT, sub, n_R)
        idx = jnp.clip(n_R - 1, 0, tokens_RT.shape[1] - 1)
        h_last = jnp.take_along_axis(h_RTD, idx[:, None, None], axis=1)[:, 0]
        cache = jax.tree_util.tree_map(lambda a, s: _put_rows(a, rows_R, s), cache, sub)
        return cache, jnp.where((n_R > 0)[:, None], h_last, last_h_RD)

    @jax.jit
    def first_token(state, h_RD, seed_R, position_R, temperature_R, top_p_R, mask_RV):
        model = nnx.merge(graphdef, state)
        return sample_rows(model.logits(h_RD), seed_R, position_R, temperature_R, top_p_R, mask_RV)

    @functools.partial(jax.jit, donate_argnums=1)
    def decode_step(state, cache, tokens_B, active_B, reset_B, emit_B, seed_B, temperature_B, top_p_B, mask_BV):
        """Feed one token per active slot (a `reset` slot starts again from length 0); return the cache and
        every slot's next token. The inputs may cover only the first B slots of the cache (the others are left
        alone: fewer rows, a cheaper step). A step where no row `emit`s (token-by-token prefill only) skips the
        unembedding and the sampling."""
        model = nnx.merge(graphdef, state)
        B = tokens_B.shape[0]
        sub = jax.tree_util.tree_map(lambda a: a[:B] if a.ndim == 1 else a[:, :B], cache)
        sub = dataclasses.replace(sub, lengths=jnp.where(reset_B, 0, sub.lengths))
        h_B1D, sub = model.extend(tokens_B[:, None], sub, active_B.astype(jnp.int32))

        def next_tokens(h_BD):
            return sample_rows(model.logits(h_BD), seed_B, sub.lengths, temperature_B, top_p_B, mask_BV)

        tokens = jax.lax.cond(jnp.any(emit_B), next_tokens, lambda h: jnp.zeros(h.shape[0], jnp.int32),
                              h_B1D[:, 0])
        cache = jax.tree_util.tree_map(lambda a, s: a.at[:B].set(s) if a.ndim == 1 else a.at[:, :B].set(s),
                                       cache, sub)
        return cache, tokens

    return prefill_rows, first_token, decode_step


class Engine:
    """Continuous batching over `max_batch` slots of `max_seq_len` tokens, with a queue of at most `max_queue`
    waiting requests. Start the loop with `start()` (or use it as a context manager); `submit()` is thread-safe.
    """

    def __init__(self, model: Transformer, *, max_batch: int = 8, max_seq_len: int = 4096, max_queue: int = 64,
                 prefill_chunk: int = PREFILL_CHUNK, model_name: str = "gpt-oss", decode_buckets: bool = True):
        """`prefill_chunk`: the longest prefill chunk (prompts are prefilled in chunks of a power of two up to
        it, the new requests of an iteration together). `prefill_chunk=1` feeds prompts token by token through
        the shared decode step instead, alongside the decoding slots: one compiled function in all (XLA:CPU
        compiles a multi-token chunk of even the tiny model for tens of seconds; the tests use this mode), but
        one step per prompt token. `decode_buckets`: a decode step runs only the slots up to the highest busy one,
        rounded up to a power of two (new requests take the lowest free slot), so a lone request does not pay for
        every slot; one compiled step per size. False: every step runs all slots (one compilation)."""
        cfg = model.config
        if not (isinstance(max_batch, int) and max_batch >= 1):
            raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        if not (isinstance(max_seq_len, int) and 2 <= max_seq_len <= cfg.max_position_embeddings):
            raise ValueError(f"max_seq_len must be in [2, {cfg.max_position_embeddings}] (the model's context), "
                             f"got {max_seq_len!r}")
        if not (isinstance(prefill_chunk, int) and prefill_chunk >= 1):
            raise ValueError(f"prefill_chunk must be an integer >= 1, got {prefill_chunk!r}")
        if not (isinstance(max_queue, int) and max_queue >= 0):
            raise ValueError(f"max_queue must be an integer >= 0, got {max_queue!r}")
        self.model = model
        self.config = cfg
        self.model_name = model_name
        self.max_batch, self.max_seq_len, self.max_queue = max_batch, max_seq_len, max_queue
        self.prefill_chunk = prefill_chunk
        self.decode_buckets = decode_buckets
        self.vocab_size = cfg.vocab_size
        self._graphdef, self._state = nnx.split(model)
        self._prefill, self._first, self._decode = engine_steps(self._graphdef)
        self._mesh = mesh_of(model)  # a sharded model: the cache sharded over the same mesh
        # A multi-process job: process 0 leads (runs the loop), the others `follow()` its device operations.
        self._channel = distributed.Channel("engine") if jax.process_count() > 1 else None
        self._cache = self._new_cache()
        self._slots: list[GenRequest | None] = [None] * max_batch
        self._next = np.zeros(max_batch, np.int32)  # each slot's last sampled token (the next decode input)
        self._seed = np.zeros(max_batch, np.uint32)
        self._temp = np.zeros(max_batch, np.float32)
        self._top_p = np.ones(max_batch, np.float32)
        self._free_mask = {}  # rows -> device all-True mask
        self._queue: collections.deque[GenRequest] = collections.deque()
        self._cond = threading.Condition()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stop = False
        # A test hook: called for each submitted request without a constraint; may return one (ForcedTokens makes
        # a random model emit a known Harmony tool call).
        self.constraint_hook: Callable[[GenRequest], Constraint | None] | None = None
        self.steps = 0  # decode steps run (for tests and stats)
        self.max_active_seen = 0

    # ---- lifecycle -------------------------------------------------------------------------------------------
    @property
    def leads(self) -> bool:
        """Whether this process runs the loop: always, except on processes 1.. of a multi-process job."""
        return self._channel is None or distributed.is_main_process()

    def start(self) -> Engine:
        if not self.leads:
            raise RuntimeError(f"process {jax.process_index()} follows process 0's engine: call follow()")
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="gptoss-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            stopped, self._stop = self._stop, True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        if self._channel is not None and self.leads and not stopped:
            self._channel.send(("stop", ()))  # the followers return from follow()

    def follow(self) -> None:
        """Processes 1.. of a multi-process job: run process 0's device operations, in its order, on this
        process's shards, until it stops its engine."""
        if self.leads:
            raise RuntimeError("follow() is for processes 1.. of a multi-process job; process 0 calls start()")
        while True:
            op, args = self._channel.recv()
            if op == "stop":
                return
            try:
                getattr(self, "_op_" + op)(*args)
            except Exception:  # noqa: BLE001 - process 0's step failed alike; it sends a fresh cache if needed
                log.exception("engine step failed (following process 0)")

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- requests --------------------------------------------------------------------------------------------
    def check(self, prompt_len: int, max_tokens: int) -> None:
        """ValueError unless a prompt of this length plus max_tokens fits a slot."""
        if prompt_len < 1:
            raise ValueError("the prompt is empty")
        if not (isinstance(max_tokens, int) and max_tokens >= 1):
            raise ValueError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
        if prompt_len + max_tokens > self.max_seq_len:
            raise ValueError(f"the prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) is "
                             f"{prompt_len + max_tokens} tokens, more than this server's context of "
                             f"{self.max_seq_len} tokens (--max-seq-len)")

    def submit(self, req: GenRequest) -> GenRequest:
        """Queue a request; raises QueueFull when `max_queue` requests are already waiting, ValueError for a
        request that cannot fit."""
        self.check(len(req.prompt), req.max_tokens)
        bad = [t for t in req.prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids outside [0, {self.vocab_size}): {bad[:5]}")
        if not req.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {req.temperature}")
        if not 0 < req.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {req.top_p}")
        if req.constraint is None and self.constraint_hook is not None:
            req.constraint = self.constraint_hook(req)
        with self._cond:
            if self._stop:
                raise EngineStopped("the engine is shut down")
            free = sum(s is None for s in self._slots)
            if len(self._queue) - free >= self.max_queue:  # requests beyond the free slots wait
                raise QueueFull(f"{len(self._queue)} requests are waiting (--max-queue {self.max_queue})")
            req.id = next(self._ids)
            req.submitted_at = time.perf_counter()
            self._queue.append(req)
            self._cond.notify_all()
        return req

    def generate(self, req: GenRequest, timeout: float | None = None) -> GenRequest:
        """Submit and wait (blocking) until the request finishes."""
        self.submit(req)
        req.done.wait(timeout)
        return req

    def stats(self) -> dict:
        with self._cond:
            return {"active": sum(s is not None for s in self._slots), "queued": len(self._queue),
                    "max_batch": self.max_batch, "max_queue": self.max_queue, "max_seq_len": self.max_seq_len,
                    "decode_steps": self.steps}

    @property
    def active(self) -> int:
        return sum(s is not None for s in self._slots)

    # ---- the loop --------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._queue and all(s is None for s in self._slots):
                    self._cond.wait()
                if self._stop:
                    break
                self._drop_cancelled_locked()
                new = []
                while self._queue and None in self._slots:
                    req = self._queue.popleft()
                    if req.cancelled:
                        self._finish(req, "cancelled")
                        continue
                    slot = self._slots.index(None)
                    self._slots[slot] = req
                    new.append(slot)
            try:
                if new and self.prefill_chunk > 1:
                    self._admit(new)
                elif new:  # token-by-token prefill in the decode step
                    for b in new:
                        r = self._slots[b]
                        self._seed[b], self._temp[b], self._top_p[b] = r.seed % (1 << 32), r.temperature, r.top_p
                with self._cond:
                    self._drop_cancelled_locked()
                if any(s is not None for s in self._slots):
                    self._step()
            except Exception as e:  # noqa: BLE001 - fail the requests in flight, keep serving
                log.exception("engine step failed")
                self._fail_all(f"engine error: {type(e).__name__}: {e}")
        self._fail_all("the engine was shut down", queued=True)

    def _drop_cancelled_locked(self) -> None:
        for b, req in enumerate(self._slots):
            if req is not None and req.cancelled:
                self._slots[b] = None
                self._finish(req, "cancelled")
        if any(r.cancelled for r in self._queue):
            for r in [r for r in self._queue if r.cancelled]:
                self._queue.remove(r)
                self._finish(r, "cancelled")

    def _fail_all(self, message: str, queued: bool = False) -> None:
        with self._cond:
            reqs = [r for r in self._slots if r is not None]
            self._slots = [None] * self.max_batch
            if queued:
                reqs += list(self._queue)
                self._queue.clear()
        for r in reqs:
            self._finish(r, None, message)
        # the cache may have been donated to a failed step: start from a fresh one
        try:
            jax.block_until_ready(self._cache.lengths)
        except Exception:  # noqa: BLE001
            self._device("reset")

    # ---- device operations: process 0 sends each to the followers, then runs it -----------------------------
    def _device(self, op: str, *args):
        if self._channel is not None:
            self._channel.send((op, args))
        return getattr(self, "_op_" + op)(*args)

    def _new_cache(self) -> KVCache:
        if self._mesh is None:
            return KVCache.create(self.config, self.max_batch, self.max_seq_len, self.model.dtype)
        return KVCache.create_sharded(self.config, self.max_batch, self.max_seq_len, self.model.dtype, self._mesh)

    def _op_reset(self) -> None:
        self._cache = self._new_cache()

    def _device_mask(self, n: int, packed: np.ndarray | None) -> jax.Array:
        """The [n, vocab] allowed-token mask on the devices: a cached all-True array for None."""
        if packed is not None:
            return self._replicated(np.unpackbits(packed, axis=-1, count=self.vocab_size).astype(bool))
        if n not in self._free_mask:
            self._free_mask[n] = self._replicated(np.ones((n, self.vocab_size), bool))
        return self._free_mask[n]

    def _replicated(self, x: np.ndarray) -> jax.Array:
        if self._mesh is None:
            return jnp.asarray(x)
        return jax.device_put(x, jax.sharding.NamedSharding(self._mesh, jax.sharding.PartitionSpec()))

    def _op_admit(self, rows, padded, lengths, chunk, seed, temp, top_p, mask) -> np.ndarray:
        """Prefill rows `rows` with `padded` prompts (their first `lengths` tokens), chunk by chunk; the first
        tokens."""
        R = len(rows)
        h = np.zeros((R, self.config.hidden_size), self.model.dtype)
        for c in range(0, padded.shape[1], chunk):
            n = np.clip(lengths - c, 0, chunk).astype(np.int32)
            self._cache, h = self._prefill(self._state, self._cache, rows, np.full((R,), c == 0),
                                           padded[:, c: c + chunk], n, h)
        return distributed.to_host(self._first(self._state, h, seed, lengths, temp, top_p,
                                               self._device_mask(R, mask)))

    def _op_decode(self, inputs, active, reset, emits, seed, temp, top_p, mask) -> np.ndarray:
        self._cache, tokens = self._decode(self._state, self._cache, inputs, active, reset, emits, seed, temp,
                                           top_p, self._device_mask(len(inputs), mask))
        return distributed.to_host(tokens)

    def _finish(self, req: GenRequest, reason: str | None, error: str | None = None) -> None:
        if req.finished:
            return
        req.finished, req.finish_reason, req.error = True, reason, error
        if req.on_finish is not None:
            try:
                req.on_finish(reason, error)
            except Exception:  # noqa: BLE001
                log.exception("on_finish callback failed")
        req.done.set()

    def _mask(self, reqs: Sequence[GenRequest | None]) -> np.ndarray | None:
        """The allowed-token mask for these rows, bit-packed along the vocabulary (`_device_mask` unpacks it);
        None (every token allowed) unless a row is constrained."""
        masks = [r.constraint.allowed() if r is not None and r.constraint is not None else None for r in reqs]
        if all(m is None for m in masks):
            return None
        out = np.ones((len(reqs), self.vocab_size), bool)
        for i, m in enumerate(masks):
            if m is not None:
                if not m.any():  # a constraint with nothing allowed would sample garbage: fail loudly instead
                    raise RuntimeError("a constraint allowed no token")
                out[i] = m
        return np.packbits(out, axis=-1)

    def _admit(self, slots: list[int]) -> None:
        """Prefill the new requests in `slots` together and sample their first tokens."""
        reqs = [self._slots[b] for b in slots]
        R = _bucket(len(slots), 1)
        lengths = np.array([len(r.prompt) for r in reqs], np.int32)
        longest = int(lengths.max())
        chunk = min(_bucket(longest, 32, self.prefill_chunk), self.prefill_chunk)
        width = -(-longest // chunk) * chunk
        padded = np.zeros((R, width), np.int32)
        for i, r in enumerate(reqs):
            padded[i, : len(r.prompt)] = r.prompt
        rows = np.full(R, self.max_batch, np.int32)  # padding rows point past the cache: gathered as 0, dropped
        rows[: len(slots)] = slots
        all_lengths = np.zeros(R, np.int32)
        all_lengths[: len(slots)] = lengths
        seed = np.zeros(R, np.uint32)
        temp = np.zeros(R, np.float32)
        top_p = np.ones(R, np.float32)
        for i, r in enumerate(reqs):
            seed[i], temp[i], top_p[i] = r.seed % (1 << 32), r.temperature, r.top_p
        mask = self._mask(list(reqs) + [None] * (R - len(reqs)))
        tokens = self._device("admit", rows, padded, all_lengths, chunk, seed, temp, top_p, mask)
        for i, b in enumerate(slots):
            r = reqs[i]
            r.fed = len(r.prompt)
            self._seed[b], self._temp[b], self._top_p[b] = seed[i], temp[i], top_p[i]
            self._emit(b, int(tokens[i]))

    def _step(self) -> None:
        with self._cond:
            reqs = list(self._slots)
        if self.decode_buckets:  # only the slots up to the highest busy one, rounded up to a power of two
            busy = max(b for b, r in enumerate(reqs) if r is not None) + 1
            reqs = reqs[: min(self.max_batch, _bucket(busy, 1))]
        R = len(reqs)
        active = np.array([r is not None for r in reqs])
        self.max_active_seen = max(self.max_active_seen, int(active.sum()))
        inputs, reset = self._next[:R].copy(), np.zeros(R, bool)
        emits = [r is not None for r in reqs]
        for b, r in enumerate(reqs):
            if r is not None and r.fed < len(r.prompt):  # token-by-token prefill
                inputs[b], reset[b] = r.prompt[r.fed], r.fed == 0
                r.fed += 1
                emits[b] = r.fed == len(r.prompt)  # the last prompt token's sample is the first new token
        mask = self._mask([r if e else None for r, e in zip(reqs, emits)])
        # Rows whose sample is discarded (mid-prompt) decode greedily: a step of only those draws nothing.
        temp = np.where(emits, self._temp[:R], 0).astype(np.float32)
        tokens = self._device("decode", inputs, active, reset, np.asarray(emits), self._seed[:R].copy(), temp,
                              self._top_p[:R].copy(), mask)
        self.steps += 1
        for b, r in enumerate(reqs):
            if r is not None and emits[b] and self._slots[b] is r:
                self._emit(b, int(tokens[b]))

    def _emit(self, b: int, token: int) -> None:
        """Slot b sampled `token`: hand it over, then finish the request or keep it for the next step."""
        req = self._slots[b]
        if req.first_token_at is None:
            req.first_token_at = time.perf_counter()
        req.tokens.append(token)
        self._next[b] = token
        if req.constraint is not None:
            req.constraint.advance(token)
        if req.on_token is not None and not req.cancelled:
            try:
                req.on_token(token)
            except Exception:  # noqa: BLE001 - a consumer's failure ends its request only
                log.exception("on_token callback failed")
                req.cancelled = True
        reason = None
        if token in req.stop_tokens:
            reason = "stop"
        elif len(req.tokens) >= req.max_tokens:
            reason = "length"
        if reason is not None or req.cancelled:
            with self._cond:
                if self._slots[b] is req:
                    self._slots[b] = None
            self._finish(req, reason or "cancelled")
