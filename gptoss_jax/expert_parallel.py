"""The MoE's experts on a mesh: each device runs only the experts it holds, on the tokens routed to them.

`model.MoE` runs this whenever its weights are on a mesh of more than one device. The table splits the experts
over `expert` and then `fsdp` (where they divide), so on most meshes every device holds a block of whole experts:
- over `expert` every device of a group has the same tokens (the batch is not split over it): each computes its
  experts' pairs and the partial sums are added (`psum`): expert parallelism;
- over `fsdp` the batch is split too, and whichever is smaller moves (`layout`): the tokens, all-gathered over
  `fsdp`, each device computing its experts' pairs for the whole group, the partial sums reduce-scattered back to
  the batch shards (the weights stay put: decode and prefill chunks), or the weights, all-gathered over `fsdp`
  per layer, FSDP-style, each device running the group's experts on its own tokens (long training sequences,
  whose routed rows outweigh a layer's experts).
Where the experts do not divide over `fsdp` the table splits their hidden size instead, and that is gathered.
The expert MLP width split over `tensor` stays split: tensor parallelism inside each expert, both matmuls split
alike, the second's partial sums added by the same reduction and its bias added on tensor shard 0 only. So the
grouped-matmul kernels run per device, inside `shard_map`, which Mosaic and Triton calls require.

Exact (no capacity limit, no token ever dropped): the router (`model.route`) runs before, in the ordinary SPMD
program. Each device runs one device's dispatch (`ops.dispatch`) over its own block of experts: its pairs sorted
first, grouped by expert (stably: one device's order), the other devices' pairs past the groups and masked out.
Every pair is computed on exactly one device, so the result equals the single-device MoE up to the order of the
float32 sums (measured: within 1e-6 relative on 8 simulated devices).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from gptoss_jax import ops
from gptoss_jax.mxfp4 import Packed
from gptoss_jax.sharding import partition_spec

AXES1 = ("experts", "expert_mlp", "embed")  # mlp1 [E, 2F, D] (Packed: [E, 2F, D/2] codes, [E, 2F, D/32] scales)
AXES2 = ("experts", "embed", "expert_mlp")  # mlp2 [E, D, F]


def _names(entry) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _is_spec(x) -> bool:
    return isinstance(x, P)


def weight_specs(w1, b1, w2, b2, mesh) -> tuple:
    """The table's PartitionSpecs of (w1, b1, w2, b2); a `Packed` weight gets a `Packed` of its two specs."""
    def spec(w, axes):
        if isinstance(w, Packed):
            return Packed(partition_spec(axes, w.blocks.shape, mesh), partition_spec(axes, w.scales.shape, mesh))
        return partition_spec(axes, w.shape, mesh)

    return (spec(w1, AXES1), partition_spec(AXES1[:2], b1.shape, mesh), spec(w2, AXES2),
            partition_spec(("experts", "embed"), b2.shape, mesh))


@dataclasses.dataclass(frozen=True)
class Layout:
    """One MoE call on a mesh. experts: the mesh axes each device's block of whole experts stays split over
    (other splits of the weights are gathered); tokens: of those, the axes the batch is split over too, whose
    tokens are all-gathered and whose sums are reduce-scattered; tensor_parallel: the expert MLP width stays
    split over `tensor`."""

    experts: tuple[str, ...]
    tokens: tuple[str, ...]
    tensor_parallel: bool

    @property
    def keep(self) -> tuple[str, ...]:
        return self.experts + ("tensor",) * self.tensor_parallel

    @property
    def psum(self) -> tuple[str, ...]:
        return tuple(a for a in self.keep if a not in self.tokens)


def layout(mesh, tokens_shape: tuple[int, int, int], w1, b1, w2, b2, act_bytes: int) -> Layout:
    """The `Layout` for routing `tokens_shape` = (batch, tokens, k) pairs through these weights: over the axes
    that split both the batch and the experts, the tokens move when their routed rows on one device (the group's
    tokens: k copies in, the first matmul's float32 output and its SwiGLU, the second's float32 output) take less
    memory than the layer's experts the device would gather instead."""
    B, T, k = tokens_shape
    F2 = b1.shape[-1]
    D = b2.shape[-1]
    specs = weight_specs(w1, b1, w2, b2, mesh)
    experts = _names(specs[1][0])
    n_tensor = mesh.shape["tensor"]
    # Both matmuls split F alike (the first's interleaved gate / linear columns, the second's input; packed
    # scales in whole 32-element groups), or `tensor` is gathered like `fsdp`.
    tp = [(s, 1) for s in jax.tree.leaves(specs[:2], is_leaf=_is_spec)]
    tp += [(s, 2) for s in jax.tree.leaves(specs[2], is_leaf=_is_spec)]
    tensor_parallel = n_tensor > 1 and (F2 // 2) % n_tensor == 0 and all(
        len(s) > d and "tensor" in _names(s[d]) for s, d in tp)
    batch_axes = _names(partition_spec(("batch",), (B,), mesh)[0])
    shared = tuple(a for a in batch_axes if a in experts)  # in the batch's order, for all_gather / psum_scatter
    if shared:
        n_shared = math.prod(mesh.shape[a] for a in shared)
        group_pairs = B // math.prod(mesh.shape[a] for a in batch_axes) * n_shared * T * k
        F2_local = F2 // (n_tensor if tensor_parallel else 1)
        rows = group_pairs * (D * act_bytes + F2_local * 4 + F2_local // 2 * act_bytes + D * 4)
        weights = sum(_shard_bytes(w, s, mesh) for w, s in zip(jax.tree.leaves((w1, w2)),
                                                               jax.tree.leaves(specs[::2], is_leaf=_is_spec)))
        if rows > weights * n_shared:  # the weights move: gathered over the shared axes, the tokens stay
            experts, shared = tuple(a for a in experts if a not in shared), ()
    return Layout(experts, shared, tensor_parallel)


def _shard_bytes(x, spec: P, mesh) -> int:
    split = [math.prod(mesh.shape[a] for a in _names(e)) for e in spec] + [1] * (x.ndim - len(spec))
    return math.prod(n // s for n, s in zip(x.shape, split)) * x.dtype.itemsize


def _gather(x, spec: P, keep: tuple[str, ...]):
    """All-gather every dimension of a shard over the mesh axes `spec` splits it over outside `keep` (always the
    minor ones of a dimension, so the gathered block is contiguous)."""
    for dim, entry in enumerate(spec):
        names = _names(entry)
        gather = tuple(n for n in names if n not in keep)
        if gather:
            assert names[len(names) - len(gather):] == gather, (spec, keep)
            x = jax.lax.all_gather(x, gather, axis=dim, tiled=True)
    return x


def moe(t_BTD, expert_BTK, weight_BTK, w1, b1, w2, b2, *, mesh, alpha: float, limit: float,
        kernels: str) -> jax.Array:
    """`ops.dispatch` over `mesh`: float32 [B, T, D] = sum_k weight * expert(t).

    t_BTD: the normed tokens; expert_BTK / weight_BTK: each token's k experts and their softmax weights (`route`);
    w1, w2: the experts' weights (`Packed` or dense [E, out, in]) with biases b1 [E, 2F], b2 [E, D].
    """
    B, T, _ = t_BTD.shape
    E = b1.shape[0]
    lay = layout(mesh, (B, T, expert_BTK.shape[-1]), w1, b1, w2, b2, t_BTD.dtype.itemsize)
    specs = weight_specs(w1, b1, w2, b2, mesh)
    tokens = P(partition_spec(("batch",), (B,), mesh)[0], None, None)
    E_local = E // math.prod(mesh.shape[a] for a in lay.experts)

    def local(t_BTD, expert_BTK, weight_BTK, w1, b1, w2, b2):
        w1, b1, w2, b2 = jax.tree.map(lambda a, s: _gather(a, s, lay.keep), (w1, b1, w2, b2), specs,
                                      is_leaf=_is_spec)
        if lay.tensor_parallel:  # each tensor shard holds part of the second matmul's sum: add its bias once
            b2 = jnp.where(jax.lax.axis_index("tensor") == 0, b2, jnp.zeros_like(b2))
        if lay.tokens:  # the weights stay: every device takes the group's tokens
            t_BTD, expert_BTK, weight_BTK = (jax.lax.all_gather(a, lay.tokens, axis=0, tiled=True)
                                             for a in (t_BTD, expert_BTK, weight_BTK))
        first = jax.lax.axis_index(lay.experts) * E_local if lay.experts else 0
        y_BTD = ops.dispatch(t_BTD, expert_BTK, weight_BTK, w1, b1, w2, b2, first=first, alpha=alpha, limit=limit,
                             kernels=kernels)
        if lay.psum:
            y_BTD = jax.lax.psum(y_BTD, lay.psum)
        if lay.tokens:
            y_BTD = jax.lax.psum_scatter(y_BTD, lay.tokens, scatter_dimension=0, tiled=True)
        return y_BTD

    # check_vma=False: the grouped-matmul twins start their loops from fresh zeros, which the varying-axes type
    # check rejects as loop carries (the values are right: out_specs hold after the reductions).
    run = jax.shard_map(local, mesh=mesh, in_specs=(tokens, tokens, tokens, *specs), out_specs=tokens,
                        check_vma=False)
    return run(t_BTD, expert_BTK, weight_BTK, w1, b1, w2, b2)
