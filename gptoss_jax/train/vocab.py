"""Training in a compact vocabulary that is exactly the full one, for models whose unseen tokens' rows are tied.

A model trained from scratch on a narrow task (the demo model) never sees most of the 201,088 tokens. If every
unembedding row of those tokens is the same vector u (true at a zero initialization), they receive the same
gradient at every step and stay equal, and their embedding rows are never read. The full softmax then equals a
softmax over the U tokens the data shows plus one extra row u whose logit is raised by log(201088 - U): the
compact model computes the same losses as the full one at ~U/201088 of the unembedding's cost, and the extra row
gets the gradient each tied row would get (`token_losses(tied_rows=...)`). The optimizer then updates that row
as it would update each of them; the global gradient norm (for clipping) counts it once, not 201088 - U times,
which with tied rows' gradients as tiny as unseen tokens' probabilities changes it by a rounding-level amount.
`expand` writes the full model back: trained rows in place, every unseen token's unembedding row = the extra row,
and the embedding rows the data never read taken from the starting checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptoss_jax.model import Transformer, init_model
from gptoss_jax.train.config import RunError

VOCAB_FILE = "vocab.json"  # a compact-vocabulary run's token ids, in its run folder


@dataclasses.dataclass(frozen=True)
class CompactVocab:
    used: tuple[int, ...]  # full-vocabulary ids the data shows, ascending; compact id i <-> used[i]
    full_size: int

    @classmethod
    def of(cls, token_arrays, full_size: int) -> CompactVocab:
        used = np.unique(np.concatenate([np.asarray(t).ravel() for t in token_arrays]))
        return cls(tuple(int(t) for t in used), full_size)

    @property
    def size(self) -> int:
        return len(self.used) + 1  # the last row stands for every token the data never shows

    def encode(self, tokens: np.ndarray) -> np.ndarray:
        """Compact ids of full-vocabulary `tokens`; tokens outside `used` map to the extra row."""
        used, tokens = np.asarray(self.used), np.asarray(tokens)
        at = np.minimum(np.searchsorted(used, tokens), len(used) - 1)
        return np.where(used[at] == tokens, at, len(used)).astype(np.int32)

    @property
    def tied_rows(self) -> int:
        """How many tokens the extra row stands for (`token_losses(tied_rows=...)`)."""
        return self.full_size - len(self.used)

    def save(self, folder: Path) -> None:
        (folder / VOCAB_FILE).write_text(json.dumps({"full_size": self.full_size, "used": list(self.used)}) + "\n")

    @classmethod
    def load(cls, folder: Path) -> CompactVocab | None:
        path = folder / VOCAB_FILE
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        return cls(tuple(data["used"]), data["full_size"])


def _rebuild(model: Transformer, vocab_size: int, embedding, unembedding) -> Transformer:
    """`model` with other vocabulary tables (and its config's vocab_size to match); every other value shared."""
    cfg = dataclasses.replace(model.config, vocab_size=vocab_size)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: init_model(cfg, dtype=model.dtype, experts="dense")))
    values = {path: v.get_value() for path, v in nnx.to_flat_state(nnx.state(model))}
    values[("embedding",)], values[("unembedding",)] = embedding, unembedding
    for path, var in nnx.to_flat_state(state):
        var.set_value(values[path])
    return nnx.merge(graphdef, state)


def compact(model: Transformer, vocab: CompactVocab) -> Transformer:
    """The compact model; raises RunError unless every unseen token's unembedding row is the same."""
    if model.config.vocab_size != vocab.full_size:
        raise RunError(f"the model's vocabulary has {model.config.vocab_size} tokens, the run's {vocab.full_size}")
    used = jnp.asarray(vocab.used)
    unseen = np.setdiff1d(np.arange(vocab.full_size), vocab.used)
    unemb = model.unembedding[...]
    other = unemb[int(unseen[0])]
    differ = int(jnp.sum(jnp.any(unemb[jnp.asarray(unseen)] != other, axis=-1)))
    if differ:
        raise RunError(f"--compact-vocab needs the unembedding rows of the {len(unseen)} tokens the data never shows "
                       f"to be equal (as in a model initialized for it, e.g. `python -m gptoss_jax.demo init`); "
                       f"{differ} of them differ from the first")
    embedding = jnp.concatenate([model.embedding[...][used], jnp.zeros_like(model.embedding[...][:1])])
    return _rebuild(model, vocab.size, embedding, jnp.concatenate([unemb[used], other[None]]))


def expand(model: Transformer, vocab: CompactVocab, source_embedding) -> Transformer:
    """The full model of a compact one; `source_embedding` [full, D] supplies the rows the data never read."""
    used = jnp.asarray(vocab.used)
    embedding = jnp.asarray(source_embedding, model.embedding[...].dtype).at[used].set(model.embedding[...][:-1])
    unemb = model.unembedding[...]
    unembedding = jnp.broadcast_to(unemb[-1], (vocab.full_size, unemb.shape[1])).at[used].set(unemb[:-1])
    return _rebuild(model, vocab.full_size, embedding, unembedding)
