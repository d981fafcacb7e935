"""A random-weight checkpoint of any size (`gptoss-jax init`), made and written one layer at a time."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptoss_jax.checkpoint.layout import Format, tensor_rules
from gptoss_jax.checkpoint.save import write
from gptoss_jax.config import ModelConfig
from gptoss_jax.model import Block, non_block_params


def write_random_checkpoint(cfg: ModelConfig, path: str | os.PathLike, format: Format = "original", *, seed: int = 0,
                            overwrite: bool = False, max_shard_bytes: int = 2 << 30, progress: bool = True) -> Path:
    """A random-weight checkpoint (MXFP4 experts) streamed to disk layer by layer: a 20b or 120b never needs to
    fit in memory. Same distribution as `init_model`, not the same values."""
    layers = _RandomLayers(cfg, seed)
    params = {r.path: lambda i, path=r.path: layers(i)[path] for r in tensor_rules(cfg, format, "mxfp4")}
    return write(params, cfg, path, format, "mxfp4", overwrite, max_shard_bytes, progress)


class _RandomLayers:
    """`layers(i)`: every parameter of layer i (None: the embeddings and final norm) as numpy, made from a key of
    its own (so any layer can be made alone) and kept until another layer is asked for."""

    def __init__(self, cfg: ModelConfig, seed: int):
        self.cfg, self.seed = cfg, seed
        self._cached: tuple[int | None, dict] = (None, {})

    def __call__(self, i: int | None) -> dict:
        if self._cached[0] != i or not self._cached[1]:
            self._cached = (i, {p: np.asarray(v.get_value()) for p, v in self._make(i).items()})
        return self._cached[1]

    def _make(self, i: int | None) -> dict:
        rngs = nnx.Rngs(jax.random.fold_in(jax.random.key(self.seed), 0 if i is None else i + 1))
        if i is None:
            emb, norm, unemb = non_block_params(self.cfg, jnp.bfloat16, rngs)
            return {("embedding",): emb, ("norm", "scale"): norm.scale, ("unembedding",): unemb}
        block = Block(self.cfg, jnp.bfloat16, "mxfp4", rngs)
        return {("blocks", *p): v for p, v in nnx.to_flat_state(nnx.state(block))}
