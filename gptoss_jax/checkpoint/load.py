"""Loading a checkpoint of either layout into a `Transformer`, on one device or placed on a mesh.

One path for both: every parameter is assembled from regions of the files' tensors, a layer at a time, and each
device's region is read alone (safetensors slicing), so on a mesh no host ever holds the whole model, nor, in a
multi-host job, even one whole layer of a sharded tensor. One device is the trivial placement: one whole region.
"""

from __future__ import annotations

import functools
import os
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from gptoss_jax.checkpoint import experts as expert_storage
from gptoss_jax.checkpoint.files import Reader
from gptoss_jax.checkpoint.layout import file_bytes, find_layout, tensor_rules, whole
from gptoss_jax.checkpoint.validate import validate
from gptoss_jax.model import Transformer
from gptoss_jax.sharding import variable_shardings


def load_model(path: str | os.PathLike, dtype=jnp.bfloat16, mesh=None, *,
               experts: Literal["auto", "mxfp4", "dense"] = "auto", progress: bool = True) -> Transformer:
    """Load a checkpoint in either layout (auto-detected). `dtype` is every non-expert parameter's dtype.

    experts: "auto" keeps them as stored (MXFP4 packed, or dense for a bf16 HF checkpoint); "dense" decodes MXFP4
    to `dtype` (for fine-tuning); "mxfp4" encodes dense experts (lossy unless they are representable).
    mesh (`gj.make_mesh`): every parameter is placed sharded as `gptoss_jax.sharding` says, a layer at a time,
    and each process reads from the files only the slices its own devices hold (safetensors slicing), so no host
    ever holds the whole model, nor, in a multi-host job, even one whole layer of a sharded tensor.
    """
    layout = find_layout(path)
    cfg = layout.config
    rules = tensor_rules(cfg, layout.format, layout.experts)
    validate(layout, rules)
    target = layout.experts if experts == "auto" else experts
    abstract = nnx.eval_shape(lambda: Transformer(cfg, dtype=dtype, experts=target, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    leaves = dict(nnx.to_flat_state(state))
    place = {} if mesh is None else dict(variable_shardings(abstract, mesh))
    with tqdm(total=file_bytes(rules, cfg.num_hidden_layers), unit="B", unit_scale=True,
              desc=f"loading {layout.folder.name}", disable=not progress) as bar, \
            Reader(layout.tensor_files, bar) as read:
        by_path = {r.path: r for r in rules}
        regions = expert_storage.regions(
            leaves, lambda p, i, index: by_path[p].region(read.read_slice, i, index), layout.experts, target)
        stacked = {}
        for p, leaf in leaves.items():
            x = leaf.get_value()
            if p[0] == "blocks":  # a zero buffer with the layer axis, filled below
                stacked[p] = _zeros(x.shape, x.dtype, place.get(p))
            else:
                leaf.set_value(_array(x.shape, x.dtype, place.get(p), functools.partial(regions[p], None)))
        read.done(n for r in rules if not r.per_layer for n in r.names)
        for i in range(cfg.num_hidden_layers):  # layer by layer: the order the files hold them in
            for p, buf in stacked.items():
                sharding = None if mesh is None else _drop_layer_axis(place[p])
                x = _array(buf.shape[1:], buf.dtype, sharding, functools.partial(regions[p], i))
                stacked[p] = _set_layer(buf, x, i)
            read.done(n.format(i=i) for r in rules if r.per_layer for n in r.names)
    for p, buf in stacked.items():
        leaves[p].set_value(buf)
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def _array(shape, dtype, sharding, region) -> jax.Array:
    """An array of `shape` from `region(explicit index)`: whole on the default device when `sharding` is None,
    else each of this process's devices filled with its part; devices that hold the same part share one read."""
    if sharding is None:
        return jnp.asarray(np.asarray(region(whole(shape))).astype(dtype, copy=False))
    cache: dict = {}

    def fill(index):
        bounds = tuple(slice(*s.indices(d)[:2]) for s, d in zip(index, shape))
        key = tuple((s.start, s.stop) for s in bounds)
        if key not in cache:
            cache[key] = np.asarray(region(bounds)).astype(dtype, copy=False)
        return cache[key]

    return jax.make_array_from_callback(tuple(shape), sharding, fill)


def _drop_layer_axis(sharding):
    """The sharding of one layer of a stacked parameter (the layer axis is never split)."""
    spec = tuple(sharding.spec)
    assert not spec or spec[0] is None, spec
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec[1:]))


def _zeros(shape, dtype, sharding) -> jax.Array:
    """A zero buffer, created already sharded when a sharding is given (never whole on one device)."""
    if sharding is None:
        return jnp.zeros(shape, dtype)
    return jax.jit(functools.partial(jnp.zeros, shape, dtype), out_shardings=sharding)()


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(buf, x, i):
    """buf[i] = x in place, so a stacked parameter is filled without a second copy."""
    return buf.at[i].set(x.astype(buf.dtype))
