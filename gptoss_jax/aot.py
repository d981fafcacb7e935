"""Ahead-of-time compiles of the steps our commands run, for a TPU or GPU target, on this host (`plan --compile`).

The steps are the very jitted functions `generate` and `finetune` call (`engine.steps`: a prefill chunk and a
decode step with per-request sampling, temperature and top-p as traced values; `train.step.make_train_step`),
lowered with `jax.ShapeDtypeStruct`s that carry the shardings our loaders and the KV cache use on a mesh of the
target's devices, then compiled by the target's own compiler (`gptoss_jax.targets`). What the compiler reports
per device is what the hardware would need: parameters, cache, optimizer state, and its own temporaries.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from gptoss_jax import targets
from gptoss_jax.config import ModelConfig
from gptoss_jax.sharding import logical_sharding, variable_shardings

INFERENCE_STEPS = ("prefill", "decode")


def abstract_model(cfg: ModelConfig, mesh, dtype=jnp.bfloat16, experts: str = "mxfp4"):
    """(graphdef, state) of the model with every leaf a ShapeDtypeStruct sharded over `mesh` by the table."""
    from gptoss_jax.model import Transformer

    abstract = nnx.eval_shape(lambda: Transformer(cfg, dtype=dtype, experts=experts, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    shardings = dict(variable_shardings(abstract, mesh))
    flat = []
    for path, var in nnx.to_flat_state(state):
        value = var.get_value()
        var.set_value(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=shardings[path]))
        flat.append((path, var))
    return graphdef, nnx.from_flat_state(flat)


def _sds(shape, dtype, mesh, axes=None):
    sharding = (logical_sharding(axes, shape, mesh) if axes is not None
                else NamedSharding(mesh, PartitionSpec()))
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def inference_lowerings(cfg: ModelConfig, mesh, batch: int, seq_len: int, dtype=jnp.bfloat16) -> dict:
    """{"prefill": lower(), "decode": lower()}: the engine's steps for `batch` sequences of up to `seq_len` tokens
    (the KV cache `generate` allocates for them, one full prefill chunk into every slot, per-row sampling)."""
    from gptoss_jax.engine import PREFILL_CHUNK, steps
    from gptoss_jax.kvcache import KVCache
    from gptoss_jax.plan import cache_length, kv_cache_shapes

    graphdef, state = abstract_model(cfg, mesh, dtype)
    prefill, _, decode = steps(graphdef)
    cache = KVCache(**kv_cache_shapes(cfg, batch, cache_length(cfg, seq_len), mesh, dtype))
    chunk = min(PREFILL_CHUNK, max(32, 1 << (seq_len - 1).bit_length()))

    def rows(dtype):
        return _sds((batch,), dtype, mesh, ("batch",))

    sampling = (rows(jnp.uint32), rows(jnp.float32), rows(jnp.float32), rows(jnp.int32))
    return {
        "prefill": lambda: prefill.lower(
            state, cache, rows(jnp.int32), rows(jnp.bool_), _sds((batch, chunk), jnp.int32, mesh, ("batch", "sequence")),
            rows(jnp.int32), _sds((batch, cfg.hidden_size), dtype, mesh, ("batch", "act_embed")), every_row=True),
        "decode": lambda: decode.lower(state, cache, rows(jnp.int32), rows(jnp.bool_), *sampling, None),
    }


def train_lowering(cfg: ModelConfig, mesh, batch: int, seq_len: int, remat: str = "full", dtype=jnp.bfloat16):
    """`finetune`'s train step (one micro-batch of `batch` packed rows of `seq_len` tokens; AdamW state sharded
    like the parameters, as the trainer makes it)."""
    from gptoss_jax.train.step import decay_mask, init_opt_state, make_optimizer, make_train_step

    graphdef, params = abstract_model(cfg, mesh, dtype, experts="dense")
    tx, schedule = make_optimizer(lr=1e-5, warmup=1, steps=2, weight_decay=0.1, clip_norm=1.0,
                                  mask=decay_mask(params))
    opt = _match_param_shardings(jax.eval_shape(lambda p: init_opt_state(tx, p), params), params, mesh)
    step = make_train_step(graphdef, tx, schedule, remat=remat)
    axes = (None, "batch", "sequence")
    shape = (1, batch, seq_len)
    data = {name: _sds(shape, jnp.float32 if name == "weights" else jnp.int32, mesh, axes)
            for name in ("inputs", "targets", "weights", "segment_ids", "positions")}
    return lambda: step.lower(params, opt, _sds((), jnp.int32, mesh), data)


def _match_param_shardings(opt, params, mesh):
    """The optimizer state sharded as the trainer's is: AdamW's moments (whose paths end with a parameter's path)
    like their parameter, everything else (the step count) replicated."""
    by_path = {tuple(map(str, path)): leaf.sharding for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    lengths = sorted({len(p) for p in by_path}, reverse=True)  # the longest match: blocks/.../norm before norm
    replicated = NamedSharding(mesh, PartitionSpec())

    def place(path, x):
        keys = tuple(map(str, path))
        sharding = next((by_path[keys[-n:]] for n in lengths if keys[-n:] in by_path), replicated)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding if x.ndim else replicated)

    return jax.tree_util.tree_map_with_path(place, opt)


def compile_steps(cfg: ModelConfig, target: targets.Target, mesh_sizes: Mapping[str, int], batch: int,
                  seq_len: int, train: bool = False, remat: str = "full") -> dict:
    """The `--json` "compile" object: every step compiled for `target` on a mesh of its first devices."""
    mesh = target.mesh(mesh_sizes)
    if train:
        lowerings = {"train": train_lowering(cfg, mesh, batch, seq_len, remat)}
    else:
        lowerings = inference_lowerings(cfg, mesh, batch, seq_len)
    steps = {name: targets.compile_report(lower, target.hbm_bytes) for name, lower in lowerings.items()}
    return {"target": target.name, "device_kind": target.device_kind, "hbm_bytes": target.hbm_bytes,
            "steps": steps}
