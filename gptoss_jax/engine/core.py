"""The inference engine: requests in fixed slots of one KV cache, prefilled in chunks and decoded together.

The cache has `max_batch` rows (slots) of `max_seq_len` tokens. A request waits in a bounded queue until a slot is
free; it is then prefilled into its slot (the requests admitted together are prefilled together: their rows are
gathered out of the cache, extended chunk by chunk and scattered back, so the other slots are neither touched nor
recomputed) and joins the shared decode step, where every busy slot advances by one token.

`gj.generate` is a client that submits a batch of requests together and drives `step()` itself; the server runs
the same engine in a background thread (`start()`), with continuous batching: a request joins as soon as a slot
is free. Either way a request gets the same tokens (see `sampling`).

A model sharded over a mesh (`load_model(..., mesh=...)`, `--mesh`) gets a cache sharded over the same mesh (slots
over data x fsdp, kv heads over tensor). In a multi-process job, either every process runs the same engine (SPMD,
as `gj.generate` does), or process 0 leads with a `distributed.Channel` (the server): every device operation it
runs is first sent to the other processes, which run the same operation on their shards in `follow()`.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptoss_jax import distributed
from gptoss_jax.engine.request import GenRequest, check_request
from gptoss_jax.engine.steps import PREFILL_CHUNK, bucket, prefill_chunks, steps
from gptoss_jax.kvcache import KVCache
from gptoss_jax.model import Transformer
from gptoss_jax.sharding import mesh_of

log = logging.getLogger("gptoss_jax.engine")


class QueueFull(RuntimeError):
    """The engine's waiting queue is full: try again later (HTTP 503 with Retry-After)."""


class EngineStopped(RuntimeError):
    """The engine was shut down."""


class Engine:
    """Requests in `max_batch` slots of `max_seq_len` tokens, with a queue of at most `max_queue` waiting ones.

    `prefill_chunk`: the longest prefill chunk (prompts are prefilled in chunks of a power of two up to it).
    `decode_buckets`: a decode step runs only the slots up to the highest busy one, rounded up to a power of two
    (new requests take the lowest free slot), so a lone request does not pay for every slot; one compiled step per
    size. False: every step runs all slots (one compilation). `channel`: process 0's `distributed.Channel` in a
    multi-process job whose other processes `follow()`; None when every process runs its own engine alike.
    """

    def __init__(self, model: Transformer, *, max_batch: int = 8, max_seq_len: int = 4096, max_queue: int = 64,
                 prefill_chunk: int = PREFILL_CHUNK, model_name: str = "gpt-oss", decode_buckets: bool = True,
                 channel: distributed.Channel | None = None):
        cfg = model.config
        for name, value, lo in (("max_batch", max_batch, 1), ("prefill_chunk", prefill_chunk, 1),
                                ("max_queue", max_queue, 0)):
            if not (isinstance(value, int) and value >= lo):
                raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
        if not (isinstance(max_seq_len, int) and 2 <= max_seq_len <= cfg.max_position_embeddings):
            raise ValueError(f"max_seq_len must be in [2, {cfg.max_position_embeddings}] (the model's context), "
                             f"got {max_seq_len!r}")
        self.model, self.config, self.model_name = model, cfg, model_name
        self.max_batch, self.max_seq_len, self.max_queue = max_batch, max_seq_len, max_queue
        self.prefill_chunk, self.decode_buckets = prefill_chunk, decode_buckets
        self.vocab_size = cfg.vocab_size
        self._state = nnx.state(model)
        self._steps = steps(nnx.graphdef(model))
        self._mesh = mesh_of(model)
        self._channel = channel
        self._cache = self._new_cache()
        self._slots: list[GenRequest | None] = [None] * max_batch
        self._next = np.zeros(max_batch, np.int32)  # each slot's last sampled token (the next decode input)
        self._seed = np.zeros(max_batch, np.uint32)
        self._temp = np.zeros(max_batch, np.float32)
        self._top_p = np.ones(max_batch, np.float32)
        self._top_k = np.zeros(max_batch, np.int32)
        self._queue: collections.deque[GenRequest] = collections.deque()
        self._cond = threading.Condition()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stop = False
        self.steps = 0  # decode steps run (for stats)
        self.max_active_seen = 0

    # ---- lifecycle -------------------------------------------------------------------------------------------
    @property
    def leads(self) -> bool:
        """Whether this process drives the engine: always, except on processes 1.. of a led job."""
        return self._channel is None or distributed.is_main_process()

    def start(self) -> Engine:
        """Run the loop in a background thread (continuous batching)."""
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
        """Processes 1.. of a led job: run process 0's device operations, in its order, on this process's shards,
        until it stops its engine."""
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
    def submit(self, req: GenRequest) -> GenRequest:
        """Queue a request (thread-safe); raises QueueFull when `max_queue` requests are already waiting,
        ValueError for a request that cannot fit."""
        req.prompt = check_request(req.prompt, req.max_tokens, vocab_size=self.vocab_size, context=self.max_seq_len)
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
        """Submit and wait (blocking) until the request finishes (the loop must be running)."""
        self.submit(req)
        req.done.wait(timeout)
        return req

    def stats(self) -> dict:
        with self._cond:
            return {"active": self.active, "queued": len(self._queue), "max_batch": self.max_batch,
                    "max_queue": self.max_queue, "max_seq_len": self.max_seq_len, "decode_steps": self.steps}

    @property
    def active(self) -> int:
        return sum(s is not None for s in self._slots)

    # ---- one iteration: admit the waiting requests that fit, then one decode step ----------------------------
    def step(self) -> None:
        """Admit waiting requests into free slots (prefill and first token), then advance every busy slot by one
        token. The background loop calls this; `gj.generate` calls it directly."""
        with self._cond:
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
        if new:
            self._admit(new)
        with self._cond:
            self._drop_cancelled_locked()
        if any(s is not None for s in self._slots):
            self._decode()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._queue and all(s is None for s in self._slots):
                    self._cond.wait()
                if self._stop:
                    break
            try:
                self.step()
            except Exception as e:  # noqa: BLE001 - fail the requests in flight, keep serving
                log.exception("engine step failed")
                self._fail_all(f"engine error: {type(e).__name__}: {e}")
        self._fail_all("the engine was shut down", queued=True)

    def _drop_cancelled_locked(self) -> None:
        for b, req in enumerate(self._slots):
            if req is not None and req.cancelled:
                self._slots[b] = None
                self._finish(req, "cancelled")
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
        try:  # the cache may have been donated to a failed step: start from a fresh one
            jax.block_until_ready(self._cache.lengths)
        except Exception:  # noqa: BLE001
            self._device("reset")

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

    def _sampling_rows(self, reqs: Sequence[GenRequest | None]):
        """seed, temperature, top_p, top_k arrays for these rows (a free row: greedy, so it draws nothing)."""
        rows = [r.sampling if r is not None else None for r in reqs]
        return (np.array([s.seed % (1 << 32) if s else 0 for s in rows], np.uint32),
                np.array([s.temperature if s else 0 for s in rows], np.float32),
                np.array([s.top_p if s else 1 for s in rows], np.float32),
                np.array([s.top_k if s else 0 for s in rows], np.int32))

    def _mask(self, reqs: Sequence[GenRequest | None]) -> np.ndarray | None:
        """The allowed-token mask of these rows, bit-packed along the vocabulary (`_device_mask` unpacks it);
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
        R = min(bucket(len(slots), 1), self.max_batch)
        lengths = np.zeros(R, np.int32)
        lengths[: len(reqs)] = [len(r.prompt) for r in reqs]
        chunk, width = prefill_chunks(lengths, self.prefill_chunk)
        padded = np.zeros((R, width), np.int32)
        for i, r in enumerate(reqs):
            padded[i, : len(r.prompt)] = r.prompt
        rows = np.full(R, self.max_batch, np.int32)  # padding rows point past the cache: gathered as 0, dropped
        rows[: len(slots)] = slots
        padded_reqs = list(reqs) + [None] * (R - len(reqs))
        sampling = self._sampling_rows(padded_reqs)
        tokens = self._device("admit", rows, padded, lengths, chunk, sampling, self._mask(padded_reqs))
        for i, b in enumerate(slots):
            self._seed[b], self._temp[b], self._top_p[b], self._top_k[b] = (a[i] for a in sampling)
            self._emit(b, int(tokens[i]))

    def _decode(self) -> None:
        with self._cond:
            reqs = list(self._slots)
        if self.decode_buckets:  # only the slots up to the highest busy one, rounded up to a power of two
            busy = max(b for b, r in enumerate(reqs) if r is not None) + 1
            reqs = reqs[: min(self.max_batch, bucket(busy, 1))]
        R = len(reqs)
        active = np.array([r is not None for r in reqs])
        self.max_active_seen = max(self.max_active_seen, int(active.sum()))
        temp = np.where(active, self._temp[:R], 0).astype(np.float32)  # a free slot draws nothing
        sampling = (self._seed[:R].copy(), temp, self._top_p[:R].copy(), self._top_k[:R].copy())
        tokens = self._device("decode", self._next[:R].copy(), active, sampling, self._mask(reqs))
        self.steps += 1
        for b, r in enumerate(reqs):
            if r is not None and self._slots[b] is r:
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
        reason = "stop" if token in req.stop_tokens else "length" if len(req.tokens) >= req.max_tokens else None
        if reason is not None or req.cancelled:
            with self._cond:
                if self._slots[b] is req:
                    self._slots[b] = None
            self._finish(req, reason or "cancelled")

    # ---- device operations: a leading process sends each to the followers, then runs it ----------------------
    def _device(self, op: str, *args):
        if self._channel is not None:
            self._channel.send((op, args))
        return getattr(self, "_op_" + op)(*args)

    def _new_cache(self) -> KVCache:
        if self._mesh is None:
            return KVCache.create(self.config, self.max_batch, self.max_seq_len, self.model.dtype)
        return KVCache.create_sharded(self.config, self.max_batch, self.max_seq_len, self.model.dtype, self._mesh)

    def _device_mask(self, packed: np.ndarray | None) -> jax.Array | None:
        if packed is None:
            return None
        mask = np.unpackbits(packed, axis=-1, count=self.vocab_size).astype(bool)
        if self._mesh is None:
            return jnp.asarray(mask)
        return jax.device_put(mask, jax.sharding.NamedSharding(self._mesh, jax.sharding.PartitionSpec()))

    def _op_reset(self) -> None:
        self._cache = self._new_cache()

    def _op_admit(self, rows, padded, lengths, chunk, sampling, mask) -> np.ndarray:
        """Prefill rows `rows` with `padded` prompts (their first `lengths` tokens), chunk by chunk; the first
        tokens."""
        R = len(rows)
        every_row = R == self.max_batch and bool((rows == np.arange(R)).all())
        h = np.zeros((R, self.config.hidden_size), self.model.dtype)
        for c in range(0, padded.shape[1], chunk):
            n = np.clip(lengths - c, 0, chunk).astype(np.int32)
            self._cache, h = self._steps.prefill(self._state, self._cache, rows, np.full((R,), c == 0),
                                                 padded[:, c: c + chunk], n, h, every_row=every_row)
        return distributed.to_host(self._steps.first_token(self._state, h, sampling[0], lengths, *sampling[1:],
                                                           self._device_mask(mask)))

    def _op_decode(self, inputs, active, sampling, mask) -> np.ndarray:
        self._cache, tokens = self._steps.decode(self._state, self._cache, inputs, active, *sampling,
                                                 self._device_mask(mask))
        return distributed.to_host(tokens)
