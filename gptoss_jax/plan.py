"""`gptoss-jax plan`: per-device memory of a model on a mesh, before renting the mesh.

Every figure except the activations is the size of an actual shard: the parameters are traced with
`jax.eval_shape` of the same jitted initializer `init_model(mesh=...)` runs, with the output shardings the
logical-axis table in `gptoss_jax.sharding` gives on a `jax.sharding.AbstractMesh` (no devices needed), and each
array's bytes on one device are those of `sharding.shard_shape(shape)`. The table never splits a dimension
unevenly, so every device holds the same shape. The KV cache is `KVCache.create`'s buffers sharded as
`KVCache.create_sharded` shards them (its length rounded up to a power of two, as `generate` allocates it).

Training (`--train`) follows the fine-tuning code (`gptoss_jax.train`): every parameter trainable in bf16 with
the experts dequantized from MXFP4 (`load_model(experts="dense")`); the optimizer state is `jax.eval_shape` of
the trainer's own `init_opt_state(make_optimizer(...))` (AdamW, float32 mu and nu), sharded like the parameters;
gradients are the train step's float32 accumulator plus one micro-batch's bf16 gradient (6 bytes a parameter).

Activations are an estimate (what is live at the peak, from the model's shapes, sharded by the same table):

- inference: one prefill chunk (`generate` prefills at most 512 tokens a step) of the batch through one layer:
  the residual stream in and out, the qkv projection and attention output, the routed expert rows (the MoE's
  sorted copies of the tokens, the first matmul's float32 output and SwiGLU activation, the second's float32
  output), the router logits, plus the last tokens' float32 logits (attention over the cache is a tiled kernel
  on TPU and GPU: no [chunk, cache] scores);
- training: the whole sequence, each layer rematerialized (the trainer's default `remat="full"`): the residual
  stream saved at every layer, one layer's forward intermediates and their cotangents (2x the inference working
  set at the full length), the final hidden states and their cotangent, and one 512-token chunk of float32
  logits with its gradient (the trainer's chunked loss, on each device). Attention is a flash kernel on TPU and
  GPU (no [T, T] scores).
The update step's per-leaf float32 temporaries and XLA's own workspace are not counted: the verdict says "fits"
only below 90% of a device's memory. `plan --compile TARGET` (`gptoss_jax.aot`) puts the compiler's own figures
for the real steps beside this estimate.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AbstractMesh, Mesh

from gptoss_jax import expert_parallel
from gptoss_jax.config import ModelConfig
from gptoss_jax.engine.steps import PREFILL_CHUNK  # the longest prefill chunk
from gptoss_jax.mxfp4 import Packed
from gptoss_jax.sharding import MESH_AXES, logical_sharding, parse_mesh, variable_shardings

GiB = 1 << 30
GRAD_BYTES_PER_PARAM = 4 + 2  # the train step's float32 accumulator + one micro-batch's bf16 gradient
FITS, TIGHT = 0.90, 1.00  # fraction of a device's memory: <= FITS "fits", <= TIGHT "tight", above: does not fit


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    devices: int
    bytes_per_device: int


# A TPU v5p-8 is 8 TensorCores = 4 chips (2 cores per chip, one JAX device each); a v5e-8 is 8 chips.
TARGETS = (
    Target("TPU v5e-8", 8, 16 * GiB),
    Target("TPU v5p-8", 4, 95 * GiB),
    Target("8xH100", 8, 80 * GiB),
)


@dataclasses.dataclass
class MemoryPlan:
    """Bytes on one device. `parts` holds each figure's breakdown (name -> bytes on one device)."""

    model: str
    mesh: dict[str, int]
    batch: int
    seq_len: int
    train: bool
    cache_len: int  # KV-cache slots of a full-attention layer (0 when training)
    params: int
    grads: int
    optimizer: int
    kv_cache: int
    activations: int
    params_global: int  # all parameters, unsharded
    parts: dict[str, dict[str, int]]

    @property
    def devices(self) -> int:
        return math.prod(self.mesh.values())

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.kv_cache + self.activations

    def verdict(self, target: Target) -> str:
        if target.devices != self.devices:
            return f"n/a: {target.devices} devices, the mesh has {self.devices}"
        need = self.total
        free = (target.bytes_per_device - need) / GiB
        if need <= FITS * target.bytes_per_device:
            return f"fits ({free:.1f} GiB free)"
        if need <= TIGHT * target.bytes_per_device:
            return f"tight ({free:.1f} GiB free, under {100 * (1 - FITS):.0f}% headroom)"
        return f"does not fit ({-free:.1f} GiB over)"

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["total"] = self.total
        out["verdicts"] = {t.name: self.verdict(t) for t in TARGETS}
        return out


def abstract_mesh(sizes: Mapping[str, int]) -> AbstractMesh:
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; axes are {MESH_AXES}")
    return AbstractMesh(tuple(int(sizes.get(a, 1)) for a in MESH_AXES), MESH_AXES)


def _shard_bytes(x, sharding=None) -> int:
    """Bytes of one device's shard of a ShapeDtypeStruct / array (with its own sharding unless one is given)."""
    sharding = x.sharding if sharding is None else sharding
    return math.prod(sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize


def sharded_param_shapes(cfg: ModelConfig, mesh: Mesh | AbstractMesh, dtype=jnp.bfloat16,
                         experts: str = "mxfp4") -> dict[tuple, jax.ShapeDtypeStruct]:
    """Every parameter as a ShapeDtypeStruct with its sharding: `jax.eval_shape` of the jitted initializer that
    `init_model(cfg, mesh=mesh)` runs (no memory, and no devices with an AbstractMesh)."""
    from gptoss_jax.model import Transformer

    def build():
        return Transformer(cfg, dtype=dtype, experts=experts, rngs=nnx.Rngs(0))

    placed = variable_shardings(nnx.eval_shape(build), mesh)
    values = jax.eval_shape(jax.jit(lambda: [v.get_value() for _, v in nnx.to_flat_state(nnx.state(build()))],
                                    out_shardings=[s for _, s in placed]))
    return {path: value for (path, _), value in zip(placed, values)}


def optimizer_state_bytes(cfg: ModelConfig, params: Mapping[tuple, jax.ShapeDtypeStruct],
                          dtype=jnp.bfloat16) -> dict[str, int]:
    """Per-device bytes of the fine-tuning optimizer state: `jax.eval_shape` of the trainer's
    `init_opt_state(make_optimizer(...))`, each leaf sharded like the parameter it belongs to (as the trainer's
    state is: it is made from the sharded parameters elementwise)."""
    from gptoss_jax.model import Transformer
    from gptoss_jax.train.step import decay_mask, init_opt_state, make_optimizer  # the trainer's own

    _, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, dtype=dtype, experts="dense", rngs=nnx.Rngs(0))))
    tx, _ = make_optimizer(lr=1e-5, warmup=1, steps=2, weight_decay=0.1, clip_norm=1.0, mask=decay_mask(state))
    opt = jax.eval_shape(lambda p: init_opt_state(tx, p), state)
    out: dict[str, int] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(opt)[0]:
        names = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
        kind = next((k.name for k in path if isinstance(k, jax.tree_util.GetAttrKey) and k.name != "value"), "")
        param = params.get(names)
        if param is not None and param.shape == leaf.shape:
            n = _shard_bytes(leaf, param.sharding)
        else:  # step counters and other scalars: on every device
            n = math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize
        key = f"{kind} ({jnp.dtype(leaf.dtype).name})" if kind else "other"
        out[key] = out.get(key, 0) + n
    return out


def kv_cache_shapes(cfg: ModelConfig, batch: int, max_len: int, mesh: Mesh | AbstractMesh,
                    dtype=jnp.bfloat16) -> dict[str, jax.ShapeDtypeStruct]:
    """The KV cache's buffers with the shardings `KVCache.create_sharded` gives them."""
    from gptoss_jax.kvcache import KVCache

    shapes = jax.eval_shape(lambda: KVCache.create(cfg, batch, max_len, dtype))
    cache_axes = ("layers", "batch", "sequence", "kv_heads", "head_dim")
    axes = {f: cache_axes for f in ("full_k", "full_v", "ring_k", "ring_v")} | {"lengths": ("batch",)}
    return {f: jax.ShapeDtypeStruct(getattr(shapes, f).shape, getattr(shapes, f).dtype,
                                    sharding=logical_sharding(a, getattr(shapes, f).shape, mesh))
            for f, a in axes.items()}


def cache_length(cfg: ModelConfig, seq_len: int) -> int:
    """The full-attention layers' slots `generate` allocates for `seq_len` tokens (a power of two >= 128)."""
    return min(max(128, 1 << (seq_len - 1).bit_length()), cfg.max_position_embeddings)


def _moe_group(cfg: ModelConfig, mesh, tokens_shape: tuple[int, int, int], train: bool, dtype) -> int:
    """How many devices' tokens the MoE gathers onto each (1 where the weights move instead)."""
    if mesh.size == 1:
        return 1
    E, D, F = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size

    def w(out, inp):
        if train:
            return jax.ShapeDtypeStruct((E, out, inp), dtype)
        return Packed(jax.ShapeDtypeStruct((E, out, inp // 2), jnp.uint8),
                      jax.ShapeDtypeStruct((E, out, inp // 32), jnp.uint8))

    b1, b2 = jax.ShapeDtypeStruct((E, 2 * F), dtype), jax.ShapeDtypeStruct((E, D), dtype)
    lay = expert_parallel.layout(mesh, tokens_shape, w(2 * F, D), b1, w(D, F), b2, jnp.dtype(dtype).itemsize)
    return math.prod(mesh.shape[a] for a in lay.tokens)


def _activation_parts(cfg: ModelConfig, mesh, batch: int, seq_len: int, train: bool, dtype,
                      cache_len: int) -> dict[str, int]:
    """The activation terms (name -> bytes on one device)."""
    B, D, V, E, F = batch, cfg.hidden_size, cfg.vocab_size, cfg.num_experts, cfg.intermediate_size
    k, N = cfg.experts_per_token, cfg.num_attention_heads
    T = seq_len if train else min(seq_len, PREFILL_CHUNK)
    act, f32 = jnp.dtype(dtype).itemsize, 4

    def b(axes, shape, itemsize):
        return math.prod(logical_sharding(axes, shape, mesh).shard_shape(shape)) * itemsize

    residual = b(("batch", "sequence", "act_embed"), (B, T, D), act)
    layer = {
        "residual in/out": 2 * residual,
        "qkv + attention out": b(("batch", "sequence", "qkv"), (B, T, cfg.qkv_size), act)
        + b(("batch", "sequence", "heads_x_dim"), (B, T, N * cfg.head_dim), act),
        "router logits": b(("batch", "sequence", "experts"), (B, T, E), f32),
        # the routed rows: k copies of each token sorted by expert; mlp1's float32 output, SwiGLU, mlp2's output;
        # for the whole group of devices whose tokens the MoE gathers (`expert_parallel.layout`)
        "routed rows": _moe_group(cfg, mesh, (B, T, k), train, dtype) * (
            b(("batch", "sequence", "act_embed"), (B, T * k, D), act)
            + b(("batch", "sequence", "expert_mlp"), (B, T * k, 2 * F), f32)
            + b(("batch", "sequence", "expert_mlp"), (B, T * k, F), f32)
            + b(("batch", "sequence", "act_embed"), (B, T * k, D), f32)),
    }
    if not train:
        parts = {f"one layer, prefill chunk of {T}: {n}": v for n, v in layer.items()}
        parts["last-token logits (f32)"] = b(("batch", "vocab"), (B, V), f32)
        return parts
    from gptoss_jax.train.step import LOSS_CHUNK  # the trainer's loss: [chunk, vocab] logits at a time

    chunk = min(LOSS_CHUNK, B * T)
    parts = {
        f"saved residual stream ({cfg.num_hidden_layers} layer inputs)": cfg.num_hidden_layers * residual,
        "one layer recomputed: forward + cotangents": 2 * sum(layer.values()),
        "final hidden states + cotangent": 2 * residual,
        f"loss: one {chunk}-token chunk of f32 logits + gradient": 2 * b(("sequence", "vocab"), (chunk, V), f32),
    }
    return parts


def plan(model: str | ModelConfig, mesh: Mapping[str, int] | str, batch: int, seq_len: int, train: bool = False,
         dtype=jnp.bfloat16) -> MemoryPlan:
    """Per-device bytes of `model` ("20b", "120b", a preset name or a ModelConfig) on a mesh of these sizes
    (`{"fsdp": 8}` or "fsdp=8"; axes left out are 1), for `batch` sequences of `seq_len` tokens: inference
    (MXFP4 experts, a KV cache for seq_len tokens) or, with `train`, full fine-tuning."""
    cfg = ModelConfig.preset(model) if isinstance(model, str) else model
    name = model if isinstance(model, str) else "custom"
    if isinstance(mesh, str):
        sizes = parse_mesh(mesh)
    else:
        unknown = set(mesh) - set(MESH_AXES)
        if unknown:
            raise ValueError(f"unknown mesh axes {sorted(unknown)}; axes are {MESH_AXES}")
        sizes = {a: int(mesh.get(a, 1)) for a in MESH_AXES}
    if batch < 1 or seq_len < 1:
        raise ValueError(f"batch and seq_len must be >= 1, got batch={batch}, seq_len={seq_len}")
    if seq_len > cfg.max_position_embeddings:
        raise ValueError(f"seq_len {seq_len} exceeds the model's context of {cfg.max_position_embeddings}")
    am = abstract_mesh(sizes)
    params = sharded_param_shapes(cfg, am, dtype, "dense" if train else "mxfp4")
    parts = {"params": {"/".join(p): _shard_bytes(x) for p, x in params.items()}}
    grads = optimizer = kv = cache_len = 0
    if train:
        trainable = [x for x in params.values() if jnp.issubdtype(x.dtype, jnp.floating)]
        grads = sum(math.prod(x.sharding.shard_shape(x.shape)) for x in trainable) * GRAD_BYTES_PER_PARAM
        parts["optimizer"] = optimizer_state_bytes(cfg, params, dtype)
        optimizer = sum(parts["optimizer"].values())
    else:
        cache_len = cache_length(cfg, seq_len)
        parts["kv_cache"] = {f: _shard_bytes(x) for f, x in kv_cache_shapes(cfg, batch, cache_len, am, dtype).items()}
        kv = sum(parts["kv_cache"].values())
    parts["activations"] = _activation_parts(cfg, am, batch, seq_len, train, dtype, cache_len)
    return MemoryPlan(
        model=name, mesh=sizes, batch=batch, seq_len=seq_len, train=train, cache_len=cache_len,
        params=sum(parts["params"].values()), grads=grads, optimizer=optimizer, kv_cache=kv,
        activations=sum(parts["activations"].values()),
        params_global=sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in params.values()),
        parts=parts)


def format_plan(p: MemoryPlan, details: bool = False) -> str:
    """The plan as Markdown tables (and, with `details`, each figure's breakdown)."""
    mesh = ",".join(f"{a}={n}" for a, n in p.mesh.items())
    what = ("full fine-tuning (bf16 weights, experts dequantized; f32 grad accumulator; AdamW f32 mu + nu)"
            if p.train else f"inference (MXFP4 experts; KV cache of {p.cache_len} slots)")
    lines = [f"gpt-oss-{p.model}, mesh {mesh} ({p.devices} devices), batch {p.batch} x {p.seq_len} tokens: {what}",
             "", "| per device | GiB |", "|---|---:|", f"| parameters | {p.params / GiB:.2f} |"]
    if p.train:
        lines += [f"| gradients (f32 accumulator + bf16) | {p.grads / GiB:.2f} |",
                  f"| optimizer state | {p.optimizer / GiB:.2f} |"]
    else:
        lines += [f"| KV cache | {p.kv_cache / GiB:.2f} |"]
    lines += [f"| activations (estimate) | {p.activations / GiB:.2f} |"]
    lines += [f"| **total** | **{p.total / GiB:.2f}** |"]
    lines += ["", f"All parameters, unsharded: {p.params_global / GiB:.2f} GiB.", "",
              "| target | devices | memory per device | verdict |", "|---|---:|---:|---|"]
    lines += [f"| {t.name} | {t.devices} | {t.bytes_per_device // GiB} GiB | {p.verdict(t)} |" for t in TARGETS]
    if details:
        for section, items in p.parts.items():
            lines += ["", f"{section}:"] + [f"  {k}: {v:,} B ({v / GiB:.3f} GiB)" for k, v in items.items()]
    return "\n".join(lines)


def format_targets(plans: list[tuple[Target, MemoryPlan]]) -> str:
    """One row per target, each planned on its own mesh (`gptoss-jax plan` without --mesh)."""
    p0 = plans[0][1]
    what = "full fine-tuning" if p0.train else "inference"
    lines = [f"gpt-oss-{p0.model}, {what}, batch {p0.batch} x {p0.seq_len} tokens; GiB per device", "",
             "| target | mesh | parameters | " + ("gradients | optimizer" if p0.train else "KV cache")
             + " | activations | total | verdict |",
             "|---|---|---:|---:|" + ("---:|" if p0.train else "") + "---:|---:|---|"]
    for t, p in plans:
        mesh = ",".join(f"{a}={n}" for a, n in p.mesh.items() if n > 1) or "one device"
        state = f"{p.grads / GiB:.2f} | {p.optimizer / GiB:.2f}" if p.train else f"{p.kv_cache / GiB:.2f}"
        lines.append(f"| {t.name} ({t.devices} x {t.bytes_per_device // GiB} GiB) | {mesh} | {p.params / GiB:.2f} | "
                     f"{state} | {p.activations / GiB:.2f} | {p.total / GiB:.2f} | {p.verdict(t)} |")
    return "\n".join(lines)


# ---- command line -----------------------------------------------------------------------------------------------
def add_parser(sub) -> None:
    """Register `gptoss-jax plan` on the CLI's subparsers."""
    from gptoss_jax.distributed import add_distributed_args

    p = sub.add_parser("plan", help="per-device memory of a model on a mesh, and whether it fits",
                       description="Per-device bytes of the parameters, the KV cache (inference) or gradients and "
                                   "optimizer state (--train), and an activation estimate, on a mesh of data x "
                                   "fsdp x tensor x expert devices: jax.eval_shape on an abstract mesh with the "
                                   "model's sharding table (no devices needed). Verdicts for TPU v5e-8 (8 x 16 GiB), "
                                   "TPU v5p-8 (4 chips x 95 GiB) and 8xH100 (8 x 80 GiB).")
    p.add_argument("--model", default="20b", help="20b, 120b or tiny (default: 20b)")
    p.add_argument("--mesh", default="", metavar="data=..,fsdp=..,tensor=..,expert=..",
                   help="mesh sizes, e.g. fsdp=2,expert=4 (axes left out are 1); without it, one summary row "
                        "per target, each on fsdp over all its devices")
    p.add_argument("--batch", type=int, default=1, help="sequences (training: one micro-batch) (default: 1)")
    p.add_argument("--seq-len", type=int, default=4096, help="tokens per sequence (default: 4096)")
    p.add_argument("--train", action="store_true", help="full-parameter fine-tuning instead of inference")
    p.add_argument("--compile", metavar="TARGET", default=None,
                   help="also compile the steps our commands run (generate's prefill chunk and decode step; with "
                        "--train the fine-tuning step) for TARGET on this host and report the compiler's "
                        "per-device bytes: a TPU topology as libtpu names it (v5e:2x2, v5e:2x4, v5p:2x2x1, "
                        "v6e:2x2, v4:2x2x1, ...) or a GPU (h100, h100:8); the mesh takes the target's first "
                        "devices (--mesh fsdp=1 is one chip; default: fsdp over all of them). Needs the `tpu` / "
                        "`gpu` extra")
    p.add_argument("--layers", type=int, default=None,
                   help="with --compile: compile this many layers instead of the model's (a quick check of what "
                        "depth does not change; memory verdicts need the full depth)")
    p.add_argument("--remat", default="full", help="with --train --compile: the trainer's --remat (default: full)")
    p.add_argument("--details", action="store_true", help="print each figure's breakdown")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    add_distributed_args(p)
    p.set_defaults(func=cmd_plan)


def cmd_plan(args) -> None:
    import json

    # The multi-host flags are accepted (one launch script for every command); a plan needs no devices.
    if args.compile:
        return _cmd_compile(args)
    if not args.mesh:
        plans = [(t, plan(args.model, {"fsdp": t.devices}, args.batch, args.seq_len, train=args.train))
                 for t in TARGETS]
        print(json.dumps({t.name: p.to_dict() for t, p in plans}, indent=2) if args.json else format_targets(plans))
        return
    result = plan(args.model, parse_mesh(args.mesh), args.batch, args.seq_len, train=args.train)
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_plan(result, details=args.details))


def _cmd_compile(args) -> None:
    import json

    from gptoss_jax import aot, targets

    targets.prepare_environment()
    try:
        target = targets.get_target(args.compile)
    except targets.TargetError as e:
        raise SystemExit(f"error: {e}") from None
    sizes = parse_mesh(args.mesh) if args.mesh else {"fsdp": len(target.devices)}
    if math.prod(sizes.values()) > len(target.devices):
        raise SystemExit(f"error: --mesh {args.mesh} needs {math.prod(sizes.values())} devices; {target.name} has "
                         f"{len(target.devices)}")
    cfg = ModelConfig.preset(args.model)
    if args.layers:
        cfg = dataclasses.replace(cfg, num_hidden_layers=args.layers)
    estimate = plan(cfg, sizes, args.batch, args.seq_len, train=args.train)
    compiled = aot.compile_steps(cfg, target, sizes, args.batch, args.seq_len, train=args.train, remat=args.remat)
    if args.json:
        print(json.dumps({**estimate.to_dict(), "compile": compiled}, indent=2))
    else:
        print(format_plan(estimate, details=args.details))
        print()
        print(format_compiled(compiled, estimate))


def format_compiled(compiled: dict, estimate: MemoryPlan) -> str:
    """The compiler's per-device bytes of each step next to the estimate, with a verdict against the device."""
    hbm = compiled["hbm_bytes"]
    lines = [f"Compiled for {compiled['target']} ({compiled['device_kind']}, {hbm / GiB:.2f} GiB per device); "
             f"GiB per device:", "",
             "| step | arguments | outputs | temporaries | aliased | total | estimate | kernel calls | compile s "
             "| verdict |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, s in compiled["steps"].items():
        if not s["ok"]:
            lines.append(f"| {name} | | | | | | {estimate.total / GiB:.2f} | | {s['seconds']} | "
                         f"does not compile: {s['error']} |")
            continue
        free = (hbm - s["total_bytes"]) / GiB
        verdict = f"fits ({free:.2f} GiB free)" if s["fits"] else f"does not fit ({-free:.2f} GiB over)"
        lines.append(f"| {name} | {s['argument_bytes'] / GiB:.2f} | {s['output_bytes'] / GiB:.2f} | "
                     f"{s['temp_bytes'] / GiB:.2f} | {s['alias_bytes'] / GiB:.2f} | {s['total_bytes'] / GiB:.2f} | "
                     f"{estimate.total / GiB:.2f} | {s['kernel_calls']} | {s['seconds']} | {verdict} |")
    return "\n".join(lines)
