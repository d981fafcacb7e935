"""Perplexity of a model on text, with the standard strided sliding window over long documents.

A document of N tokens has N - 1 scored tokens (token t is predicted from tokens < t; there is no BOS in
gpt-oss). Windows start at 0, S, 2S, ... and hold up to W input tokens; each window scores only the targets that
no earlier window scored, so every token is scored exactly once, with at least W - S + 1 tokens of left context
(fewer only near the start of the document). W >= N gives one window: the plain full-context loss.

Windows of all documents are padded to one length and batched through the model's `hidden` forward, and the
cross-entropy is taken with `gptoss_jax.train.step.token_losses` (the unembedding and log-softmax run over
`chunk` tokens at a time, so the [tokens, 201088] logits never exist whole).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from gptoss_jax import harmony
from gptoss_jax.jsonl import records
from gptoss_jax.train.step import token_losses


@dataclass(frozen=True)
class PerplexityResult:
    tokens: int  # scored tokens
    documents: int  # documents with at least two tokens
    nll: float  # mean negative log-likelihood per scored token, nats
    perplexity: float  # exp(nll)
    window: int
    stride: int
    windows: int  # forward rows run

    def to_dict(self) -> dict:
        return asdict(self)


def load_documents(path: str | os.PathLike) -> list[str]:
    """A .jsonl file: one document per line, its "text" field; any other file: the whole file is one document."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such data file: {path}")
    if path.suffix != ".jsonl":
        return [path.read_text(encoding="utf-8")]
    docs = []
    for where, obj in records(path):
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise ValueError(f"{where}: expected an object with a string \"text\" field")
        docs.append(obj["text"])
    return docs


def windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """The strided windows over a document of n tokens: (begin, first, last) with input tokens [begin, last) and
    scored targets first..last (token indices; target t is predicted from tokens begin..t-1)."""
    _check(window, stride)
    out = []
    begin, prev_last = 0, 0
    while prev_last < n - 1:
        last = min(begin + window, n - 1)
        out.append((begin, prev_last + 1, last))
        prev_last = last
        begin += stride
    return out


def _check(window: int, stride: int) -> None:
    if not (isinstance(window, int) and window >= 1):
        raise ValueError(f"window must be a positive integer, got {window!r}")
    if not (isinstance(stride, int) and 1 <= stride <= window):
        raise ValueError(f"stride must be an integer in [1, window={window}], got {stride!r}")


def _rows(docs_tokens: list[list[int]], window: int, stride: int):
    """(inputs, targets, weights) per window, unpadded."""
    for toks in docs_tokens:
        toks = np.asarray(toks, np.int32)
        for begin, first, last in windows(len(toks), window, stride):
            inputs = toks[begin:last]
            targets = toks[begin + 1 : last + 1]
            weights = (np.arange(begin + 1, last + 1) >= first).astype(np.float32)
            yield inputs, targets, weights


def perplexity(model, data, *, window: int = 1024, stride: int = 512, batch_size: int = 4, chunk: int = 256,
               progress: bool = True) -> PerplexityResult:
    """Perplexity of `model` on `data`: a path (.txt: raw text, one document; .jsonl: a "text" field per line), a
    list of strings (documents) or a list of token-id lists. See the module docstring for the windowing."""
    _check(window, stride)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if window > model.config.max_position_embeddings:
        raise ValueError(f"window {window} exceeds the model's context of {model.config.max_position_embeddings}")
    if isinstance(data, (str, os.PathLike)):
        data = load_documents(data)
    docs = [harmony.encode(d) if isinstance(d, str) else [int(t) for t in d] for d in data]
    docs = [d for d in docs if len(d) >= 2]
    if not docs:
        raise ValueError("no document has two or more tokens: nothing to score")
    rows = list(_rows(docs, window, stride))
    L = max(len(r[0]) for r in rows)  # one padded length: one compilation
    graphdef, state = nnx.split(model)
    step = _eval_step(graphdef, chunk)

    total, count = 0.0, 0.0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(rows), desc="perplexity", unit="window")
    for s in range(0, len(rows), batch_size):
        part = rows[s : s + batch_size]
        batch = {k: np.zeros((batch_size, L), dt) for k, dt in
                 (("inputs", np.int32), ("targets", np.int32), ("weights", np.float32))}
        for b, (x, y, w) in enumerate(part):
            batch["inputs"][b, : len(x)] = x
            batch["targets"][b, : len(y)] = y
            batch["weights"][b, : len(w)] = w
        batch["segment_ids"] = np.ones((batch_size, L), np.int32)
        batch["positions"] = np.broadcast_to(np.arange(L, dtype=np.int32), (batch_size, L)).copy()
        t, n = step(state, batch)
        total += float(t)
        count += float(n)
        if bar is not None:
            bar.update(len(part))
            bar.set_postfix(ppl=f"{math.exp(total / max(count, 1)):.3g}")
    if bar is not None:
        bar.close()
    nll = total / count
    return PerplexityResult(tokens=int(round(count)), documents=len(docs), nll=nll, perplexity=math.exp(nll),
                            window=window, stride=stride, windows=len(rows))


_STEPS: dict = {}


def _eval_step(graphdef, chunk: int):
    key = (graphdef, chunk)
    if key not in _STEPS:
        _STEPS[key] = jax.jit(lambda state, batch: token_losses(nnx.merge(graphdef, state), batch, chunk=chunk))
    return _STEPS[key]
