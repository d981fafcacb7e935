"""The MoE's experts on a mesh: each device runs only the experts it holds, on the tokens routed to them.

`model.MoE` runs this whenever its weights are on a mesh of more than one device: under expert > 1 (dividing the
experts) it is expert parallelism; under fsdp / tensor alone every device runs all experts on its own tokens,
FSDP-style (weights gathered per layer), tensor-parallel inside the experts. Either way the grouped-matmul
kernels run per device, inside `shard_map`, which Mosaic and Triton calls require.

Scheme (`jax.shard_map`; exact, no capacity limit, no token ever dropped):
1. The router runs as before, in the ordinary SPMD program (float32 top-k, softmax over the k).
2. Inside the shard_map, every device holds the tokens of its batch shard (batch over data x fsdp, as the table
   says; the tokens are the same on the devices of one expert group) and the weights of E / expert experts.
   Weight dimensions the table splits over `fsdp` (the hidden size) are all-gathered first, FSDP-style; the
   expert MLP width split over `tensor` stays split (tensor parallelism inside each expert).
3. Each device sorts its (token, expert) pairs so that the pairs of its own experts come first, grouped by
   expert, and runs the same grouped matmuls as one device does (`ops.grouped_matmul_swiglu`,
   `ops.grouped_matmul`; rows past the local groups come out zero) over its local experts only.
4. The pairs' outputs, weighted by the router, are summed per token and `psum`-ed over `expert` (and over
   `tensor`, whose shards each hold part of the second matmul's sum; its bias is added on tensor shard 0 only).

Every (token, expert) pair is computed on exactly one expert shard, so the result equals the single-device MoE
up to the order of the float32 sums (measured: within 1e-6 relative on 8 simulated devices).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from gptoss_jax import ops
from gptoss_jax.mxfp4 import Packed
from gptoss_jax.sharding import partition_spec

AXES1 = ("experts", "expert_mlp", "embed")  # mlp1 [E, 2F, D] (Packed: [E, 2F, D/2] codes, [E, 2F, D/32] scales)
AXES2 = ("experts", "embed", "expert_mlp")  # mlp2 [E, D, F]


def _spec(axes, shape, mesh) -> P:
    return partition_spec(axes, shape, mesh)


def _gather(x, spec: P, keep: tuple[str, ...]):
    """All-gather every dimension of a shard that `spec` splits over mesh axes outside `keep`."""
    for dim, names in enumerate(spec):
        names = () if names is None else (names,) if isinstance(names, str) else tuple(names)
        gather = tuple(n for n in names if n not in keep)
        if gather:
            assert not set(names) & set(keep), (spec, keep)  # the table never mixes them on one dimension
            x = jax.lax.all_gather(x, gather, axis=dim, tiled=True)
    return x


def moe(t_BTD, expert_BTK, weight_BTK, w1, b1, w2, b2, *, mesh, alpha: float, limit: float, kernels: str,
        dtype) -> jax.Array:
    """The experts' part of the MoE, expert-parallel over `mesh`: float32 [B, T, D] = sum_k weight * expert(t).

    t_BTD: the normed tokens; expert_BTK / weight_BTK: each token's k experts and their softmax weights; w1, w2:
    the experts' weights (`Packed` or dense [E, out, in]) with biases b1 [E, 2F], b2 [E, D]; `dtype`: the
    activations' dtype (the SwiGLU output is cast to it before the second matmul, as on one device).
    """
    B, T, D = t_BTD.shape
    E, F2 = b1.shape
    n_tensor = mesh.shape["tensor"]
    batch = _spec(("batch",), (B,), mesh)[0]
    tokens = P(batch, None, None)

    def specs(w, axes):
        if isinstance(w, Packed):
            return Packed(_spec(axes, w.blocks.shape, mesh), _spec(axes, w.scales.shape, mesh))
        return _spec(axes, w.shape, mesh)

    w1_spec, w2_spec = specs(w1, AXES1), specs(w2, AXES2)
    # The table splits the experts over `expert` when that axis divides them; otherwise every device holds all.
    n_expert = mesh.shape["expert"] if _spec(("experts",), (E,), mesh)[0] == "expert" else 1
    b1_spec, b2_spec = _spec(AXES1[:2], b1.shape, mesh), _spec(("experts", "embed"), b2.shape, mesh)
    # Tensor parallelism inside the experts needs the first matmul's output (interleaved gate / linear columns)
    # and the second's input split alike: F over `tensor` in both. Otherwise `tensor` is gathered like `fsdp`.
    # Packed: the scales must split alike (whole 32-element groups on every shard).
    tp_specs = [(s, 1) for s in jax.tree.leaves((w1_spec, b1_spec), is_leaf=lambda x: isinstance(x, P))]
    tp_specs += [(s, 2) for s in jax.tree.leaves(w2_spec, is_leaf=lambda x: isinstance(x, P))]
    tensor_parallel = n_tensor > 1 and (F2 // 2) % n_tensor == 0 and all(
        len(s) > d and s[d] == "tensor" for s, d in tp_specs)
    keep = ("expert",) * (n_expert > 1) + ("tensor",) * tensor_parallel
    reduce_axes = keep

    def local(t_BTD, expert_BTK, weight_BTK, w1, b1, w2, b2):
        w1, w2 = (jax.tree.map(lambda a, s: _gather(a, s, keep), w, s, is_leaf=lambda x: isinstance(x, P))
                  for w, s in ((w1, w1_spec), (w2, w2_spec)))
        b1, b2 = _gather(b1, b1_spec, keep), _gather(b2, b2_spec, keep)
        if tensor_parallel:  # each tensor shard holds part of the second matmul's sum: add its bias once
            b2 = jnp.where(jax.lax.axis_index("tensor") == 0, b2, jnp.zeros_like(b2))
        Bl, Tl, _ = t_BTD.shape
        k = expert_BTK.shape[-1]
        E_local = E // n_expert
        t_TD = t_BTD.reshape(Bl * Tl, D)
        first = jax.lax.axis_index("expert") * E_local if n_expert > 1 else 0
        local_M = expert_BTK.reshape(-1) - first
        mine_M = (local_M >= 0) & (local_M < E_local)
        # this device's pairs first, grouped by local expert (stable: same order as on one device); the others
        # (key E_local) last, past the groups, where the grouped matmuls leave zeros
        order_M = jnp.argsort(jnp.where(mine_M, local_M, E_local), stable=True)
        group_sizes = jnp.bincount(jnp.where(mine_M, local_M, E_local), length=E_local + 1)[:E_local]
        x_MD = jnp.take(t_TD, order_M // k, axis=0)
        a_MF = ops.grouped_matmul_swiglu(x_MD, group_sizes, w1, b1, alpha=alpha, limit=limit, kernels=kernels)
        y_MD = ops.grouped_matmul(a_MF.astype(dtype), group_sizes, w2, b2, kernels=kernels)
        y_TKD = jnp.take(y_MD, jnp.argsort(order_M), axis=0).reshape(Bl * Tl, k, D)
        y_TKD = jnp.where(mine_M.reshape(Bl * Tl, k, 1), y_TKD, 0.0)
        y_TD = jnp.einsum("tkd,tk->td", y_TKD, weight_BTK.reshape(Bl * Tl, k))
        if reduce_axes:
            y_TD = jax.lax.psum(y_TD, reduce_axes)
        return y_TD.reshape(Bl, Tl, D)

    # check_vma=False: the grouped-matmul twins start their loops from fresh zeros, which the varying-axes type
    # check rejects as loop carries (the values are right: out_specs hold after the psum).
    run = jax.shard_map(local, mesh=mesh, in_specs=(tokens, tokens, tokens, w1_spec, b1_spec, w2_spec, b2_spec),
                        out_specs=tokens, check_vma=False)
    return run(t_BTD, expert_BTK, weight_BTK, w1, b1, w2, b2)
