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
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec
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
    "experts": ("expert", "fsdp"),  # whole experts on each device: the MoE moves tokens, not weights
    "expert_mlp": ("tensor",),
    # activations and the KV cache
    "sequence": (),
    "act_embed": (),  # an activation's hidden dimension stays whole (parameters' "embed" goes over fsdp)
    "kv_heads": ("tensor",),
    "head_dim": (),
}


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, expert: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes ("data", "fsdp", "tensor", "expert") over `devices` (default: every device of the job,
    all processes of a multi-host job included, once `jax.distributed` is initialized). The sizes must multiply
    to the number of devices.

    Devices are laid out by `jax.make_mesh` (which follows the TPU / GPU topology, so the innermost axes get the
    fastest links; on CPU it keeps `jax.devices()` order: process 0's devices first). Axes are "auto" (the
    compiler propagates shardings), not explicit. Where jax.make_mesh cannot map the shape onto the topology
    (e.g. several TPU slices), the devices are taken in order.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = (data, fsdp, tensor, expert)
    if any(not isinstance(s, int) or s < 1 for s in sizes):
        raise ValueError(f"mesh sizes must be integers >= 1, got data={data}, fsdp={fsdp}, tensor={tensor}, "
                         f"expert={expert}")
    if math.prod(sizes) != len(devices):
        raise ValueError(f"a mesh of data={data} x fsdp={fsdp} x tensor={tensor} x expert={expert} = "
                         f"{math.prod(sizes)} devices, but there are {len(devices)}")
    try:
        return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
        return Mesh(np.asarray(devices, dtype=object).reshape(sizes), MESH_AXES)


def parse_mesh(text: str) -> dict[str, int]:
    """"data=2,fsdp=4" (the command line's --mesh) -> {"data": 2, "fsdp": 4, "tensor": 1, "expert": 1}."""
    sizes = dict.fromkeys(MESH_AXES, 1)
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or name not in sizes:
            raise ValueError(f"--mesh: expected NAME=SIZE with NAME in {', '.join(MESH_AXES)}, got {item!r}")
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"--mesh: {name} must be a positive integer, got {value!r}")
        sizes[name] = int(value)
    return sizes


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


RESIDUAL = ("batch", "sequence", "act_embed")  # the residual stream [B, T, D]


def mesh_of_array(x) -> AbstractMesh | None:
    """The (abstract) mesh a concrete or traced array is sharded over, when it is ours and has > 1 device. Inside
    `jit` this is how a module finds its model's mesh: from any of its parameters' types."""
    mesh = jax.typeof(x).sharding.mesh
    if mesh.empty or mesh.size <= 1 or not set(MESH_AXES) <= set(mesh.axis_names):
        return None
    return mesh


def constrain(x: jax.Array, axes: Sequence[str | None], mesh: Mesh | AbstractMesh | None) -> jax.Array:
    """`x` constrained to the table's sharding for its logical `axes` (an activation, e.g. the residual stream:
    `RESIDUAL`) inside a jitted computation; unchanged without a mesh (one device)."""
    if mesh is None or mesh.size <= 1:
        return x
    return jax.lax.with_sharding_constraint(x, logical_sharding(axes, x.shape, mesh))


def variable_shardings(model: nnx.Module, mesh: Mesh) -> list[tuple[tuple, NamedSharding]]:
    """(flat state path, NamedSharding) for every variable of `model` (concrete or abstract), by the table."""
    return [(path, NamedSharding(mesh, partition_spec(v.get_metadata().get("axes", ()), v.get_value().shape,
                                                      mesh)))
            for path, v in nnx.to_flat_state(nnx.state(model))]
