"""Sharding: one table from logical axes to mesh axes. Modules declare logical axes on their parameters
(`nnx.Param(..., axes=(...))`); only this module names mesh axes.

Mesh axes: "data" (batch), "fsdp" (batch and parameters), "tensor" (heads, expert MLP, vocabulary), "expert"
(experts). A mesh axis that does not divide a dimension, or that an earlier dimension of the same array already
uses, is left out for that dimension: the array is replicated along it (5 experts on expert=2 are replicated,
never an error). `partition_spec` applies the table; `RULES` is the table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from flax import nnx

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# logical axis -> the mesh axes it is split over, in order.
RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "layers": (),
    "embed": ("fsdp",),
    "vocab": ("tensor",),
    "qkv": ("tensor",),
    "heads": ("tensor",),
    "heads_x_dim": ("tensor",),
    "experts": ("expert",),
    "expert_mlp": ("tensor",),
    # activations and the KV cache
    "sequence": (),
    "kv_heads": ("tensor",),
    "head_dim": (),
}


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, expert: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes ("data", "fsdp", "tensor", "expert") over `devices` (default: every device of the job,
    all processes of a multi-host job included). The sizes must multiply to the number of devices."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = (data, fsdp, tensor, expert)
    if any(not isinstance(s, int) or s < 1 for s in sizes):
        raise ValueError(f"mesh sizes must be integers >= 1, got data={data}, fsdp={fsdp}, tensor={tensor}, "
                         f"expert={expert}")
    if math.prod(sizes) != len(devices):
        raise ValueError(f"a mesh of data={data} x fsdp={fsdp} x tensor={tensor} x expert={expert} = "
                         f"{math.prod(sizes)} devices, but there are {len(devices)}")
    return Mesh(np.asarray(devices, dtype=object).reshape(sizes), MESH_AXES)


def partition_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                   rules: dict[str, tuple[str, ...]] = RULES) -> PartitionSpec:
    """The PartitionSpec of an array with these logical `axes` (leading dimensions without one, such as the
    stacked layer axis, are not split)."""
    axes = (None,) * (len(shape) - len(axes)) + tuple(axes)
    used: set[str] = set()
    spec = []
    for name, dim in zip(axes, shape):
        if name is not None and name not in rules:
            raise KeyError(f"no sharding rule for logical axis {name!r}; rules: {sorted(rules)}")
        chosen, split = [], 1
        for mesh_axis in rules.get(name, ()) if name else ():
            n = mesh.shape[mesh_axis]
            if n > 1 and mesh_axis not in used and dim % (split * n) == 0:
                chosen.append(mesh_axis)
                split *= n
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return PartitionSpec(*spec)


def mesh_of(model: nnx.Module) -> Mesh | None:
    """The mesh a model's parameters are sharded over (None for a model on one device)."""
    sharding = getattr(model.embedding.get_value(), "sharding", None)
    return sharding.mesh if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1 else None


def logical_sharding(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, partition_spec(axes, shape, mesh))


def variable_shardings(model: nnx.Module, mesh: Mesh) -> list[tuple[tuple, NamedSharding]]:
    """(flat state path, NamedSharding) for every variable of `model` (concrete or abstract), by the table."""
    return [(path, NamedSharding(mesh, partition_spec(v.get_metadata().get("axes", ()), v.get_value().shape,
                                                      mesh)))
            for path, v in nnx.to_flat_state(nnx.state(model))]
