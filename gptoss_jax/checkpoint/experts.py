"""Expert matrices between their two storages, MXFP4 (codes "blocks" [.., rows, cols/2] and "scales"
[.., rows, cols/32]) and dense ("weight" [.., rows, cols]), a region at a time: the one conversion table that
loading (file -> model) and saving (model -> file) both use.

A region is a layer's `[index]` (explicit slices). MXFP4 groups 32 columns under one scale, so a converted region
is computed from the whole groups that cover it, then cut to the columns asked for.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax.numpy as jnp
import numpy as np

from gptoss_jax import mxfp4
from gptoss_jax.checkpoint.layout import EXPERTS

PARTS = {"mxfp4": ("blocks", "scales"), "dense": ("weight",)}

ParamPath = tuple[str, ...]
Region = Callable[["int | None", tuple[slice, ...]], np.ndarray]  # (layer, index) -> that part of a parameter


def regions(paths, read: Callable[[ParamPath, "int | None", tuple[slice, ...]], np.ndarray], stored: str,
            target: str) -> dict[ParamPath, Region]:
    """Our parameters `paths` (experts in `target` storage) as region readers, given `read(path, layer, index)` of
    the parameters as they are held (experts in `stored` storage)."""
    out = {p: functools.partial(read, p) for p in paths if p[:-1] not in EXPERTS}
    for base in EXPERTS:
        def read_part(part, i, index, base=base):
            return read(base + (part,), i, index)
        out.update({base + (part,): f for part, f in _convert(stored, target, read_part).items()})
    return out


def _convert(stored: str, target: str, read) -> dict[str, Region]:
    """Our `target` parts ("blocks"/"scales" or "weight") of one expert matrix as region readers, given `read` of
    its `stored` parts."""
    if stored == target:
        return {part: functools.partial(read, part) for part in PARTS[stored]}
    if target == "dense":
        def weight(i, index):
            *lead, cols = index
            g0, g1 = cols.start // 32, -(-cols.stop // 32)
            w = mxfp4.decode(read("blocks", i, (*lead, slice(16 * g0, 16 * g1))),
                             read("scales", i, (*lead, slice(g0, g1))), jnp.float32)
            return np.asarray(w)[..., cols.start - 32 * g0: cols.stop - 32 * g0]
        return {"weight": weight}

    cache: dict = {}

    def encoded(i, lead, g0, g1) -> mxfp4.Packed:
        # blocks and scales of the same region come from one encode; only the current layer's are kept
        key = (i, tuple((s.start, s.stop) for s in lead), g0, g1)
        if key not in cache:
            for k in [k for k in cache if k[0] != i]:
                del cache[k]
            cache[key] = mxfp4.encode(np.asarray(read("weight", i, (*lead, slice(32 * g0, 32 * g1))), np.float32))
        return cache[key]

    def blocks(i, index):
        *lead, cols = index
        g0, g1 = cols.start // 16, -(-cols.stop // 16)
        return encoded(i, lead, g0, g1).blocks[..., cols.start - 16 * g0: cols.stop - 16 * g0]

    def scales(i, index):
        *lead, cols = index
        return encoded(i, lead, cols.start, cols.stop).scales
    return {"blocks": blocks, "scales": scales}
