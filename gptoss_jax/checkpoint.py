"""Reading and writing the two public checkpoint layouts (docs/spec.md, "Checkpoint layouts") with safetensors.

Loading is lazy: every tensor's name, shape and dtype is checked against the config before any data is read,
then tensors are read one at a time and placed on the device, MXFP4 experts kept packed. Saving writes into a
temporary folder beside the target and renames it into place last, so a crash never leaves a folder that looks
like a complete checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Callable, Literal

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from gptoss_jax import mxfp4
from gptoss_jax.config import ConfigError, ModelConfig, load_json
from gptoss_jax.model import Block, Transformer, non_block_params
from gptoss_jax.sharding import variable_shardings

Format = Literal["original", "hf"]
FLOAT_DTYPES = ("BF16", "F16", "F32")
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint folder or file is not what the config and layout require."""


# ---- the tensor table ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Rule:
    """How one parameter of ours (a flat state path) maps to checkpoint tensors of one layout.

    `names` are templates with `{i}` for the layer; `join` turns their arrays (in order) into ours and `split`
    back. Per-layer rules fill our leading layer axis one layer at a time.
    """

    path: tuple[str, ...]
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]  # per checkpoint tensor, without the layer axis
    kind: Literal["float", "uint8"] = "float"
    per_layer: bool = True
    join: Callable[[list[np.ndarray]], np.ndarray] = lambda xs: xs[0]
    split: Callable[[np.ndarray], list[np.ndarray]] = lambda x: [x]
    # How a part of our array maps to parts of the file's (`_read_region`, for sharded loading): "same" (the
    # file's tensor as is), "packed" (`_packed_rule`), "concat0" (the names concatenated along axis 0),
    # "swap_last" (the file's last two axes swapped).
    slicing: Literal["same", "packed", "concat0", "swap_last"] = "same"


def _swap_last(x: np.ndarray) -> np.ndarray:
    return np.swapaxes(x, -1, -2)


def _packed_rule(path, name: str, shapes) -> Rule:
    """MXFP4 codes: the file's [..., rows, cols/32, 16] held as [..., rows, cols/2] (same bytes, a free view)."""
    return Rule(path, (name,), shapes, "uint8", join=lambda xs: xs[0].reshape(*xs[0].shape[:-2], -1),
                split=lambda x: [x.reshape(*x.shape[:-1], -1, 16)], slicing="packed")


def tensor_rules(cfg: ModelConfig, fmt: Format, experts: Literal["mxfp4", "dense"]) -> list[Rule]:
    D, V, E, F = cfg.hidden_size, cfg.vocab_size, cfg.num_experts, cfg.intermediate_size
    N, K, H = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    if experts == "dense" and fmt == "original":
        raise CheckpointError("the original layout stores experts only as MXFP4")
    packed1 = ((E, 2 * F, D // 32, 16), (E, 2 * F, D // 32))
    packed2 = ((E, D, F // 32, 16), (E, D, F // 32))
    if fmt == "original":
        a, m = "block.{i}.attn.", "block.{i}.mlp."
        return [
            Rule(("embedding",), ("embedding.weight",), ((V, D),), per_layer=False),
            Rule(("unembedding",), ("unembedding.weight",), ((V, D),), per_layer=False),
            Rule(("norm", "scale"), ("norm.scale",), ((D,),), per_layer=False),
            Rule(("blocks", "attn", "norm", "scale"), (a + "norm.scale",), ((D,),)),
            Rule(("blocks", "attn", "qkv_w"), (a + "qkv.weight",), ((cfg.qkv_size, D),)),
            Rule(("blocks", "attn", "qkv_b"), (a + "qkv.bias",), ((cfg.qkv_size,),)),
            Rule(("blocks", "attn", "out_w"), (a + "out.weight",), ((D, N * H),)),
            Rule(("blocks", "attn", "out_b"), (a + "out.bias",), ((D,),)),
            Rule(("blocks", "attn", "sinks"), (a + "sinks",), ((N,),)),
            Rule(("blocks", "mlp", "norm", "scale"), (m + "norm.scale",), ((D,),)),
            Rule(("blocks", "mlp", "gate_w"), (m + "gate.weight",), ((E, D),)),
            Rule(("blocks", "mlp", "gate_b"), (m + "gate.bias",), ((E,),)),
            _packed_rule(("blocks", "mlp", "mlp1", "blocks"), m + "mlp1_weight.blocks", packed1[:1]),
            Rule(("blocks", "mlp", "mlp1", "scales"), (m + "mlp1_weight.scales",), packed1[1:], "uint8"),
            Rule(("blocks", "mlp", "mlp1_b"), (m + "mlp1_bias",), ((E, 2 * F),)),
            _packed_rule(("blocks", "mlp", "mlp2", "blocks"), m + "mlp2_weight.blocks", packed2[:1]),
            Rule(("blocks", "mlp", "mlp2", "scales"), (m + "mlp2_weight.scales",), packed2[1:], "uint8"),
            Rule(("blocks", "mlp", "mlp2_b"), (m + "mlp2_bias",), ((E, D),)),
        ]
    a, m = "model.layers.{i}.self_attn.", "model.layers.{i}.mlp."
    qkv_sizes = (N * H, K * H, K * H)
    cuts = np.cumsum(qkv_sizes)[:-1]
    rules = [
        Rule(("embedding",), ("model.embed_tokens.weight",), ((V, D),), per_layer=False),
        Rule(("unembedding",), ("lm_head.weight",), ((V, D),), per_layer=False),
        Rule(("norm", "scale"), ("model.norm.weight",), ((D,),), per_layer=False),
        Rule(("blocks", "attn", "norm", "scale"), ("model.layers.{i}.input_layernorm.weight",), ((D,),)),
        Rule(("blocks", "attn", "qkv_w"), tuple(a + f"{p}_proj.weight" for p in "qkv"),
             tuple((s, D) for s in qkv_sizes), join=np.concatenate, split=lambda x: np.split(x, cuts),
             slicing="concat0"),
        Rule(("blocks", "attn", "qkv_b"), tuple(a + f"{p}_proj.bias" for p in "qkv"),
             tuple((s,) for s in qkv_sizes), join=np.concatenate, split=lambda x: np.split(x, cuts),
             slicing="concat0"),
        Rule(("blocks", "attn", "out_w"), (a + "o_proj.weight",), ((D, N * H),)),
        Rule(("blocks", "attn", "out_b"), (a + "o_proj.bias",), ((D,),)),
        Rule(("blocks", "attn", "sinks"), (a + "sinks",), ((N,),)),
        Rule(("blocks", "mlp", "norm", "scale"), ("model.layers.{i}.post_attention_layernorm.weight",), ((D,),)),
        Rule(("blocks", "mlp", "gate_w"), (m + "router.weight",), ((E, D),)),
        Rule(("blocks", "mlp", "gate_b"), (m + "router.bias",), ((E,),)),
        Rule(("blocks", "mlp", "mlp1_b"), (m + "experts.gate_up_proj_bias",), ((E, 2 * F),)),
        Rule(("blocks", "mlp", "mlp2_b"), (m + "experts.down_proj_bias",), ((E, D),)),
    ]
    if experts == "mxfp4":
        rules += [
            _packed_rule(("blocks", "mlp", "mlp1", "blocks"), m + "experts.gate_up_proj_blocks", packed1[:1]),
            Rule(("blocks", "mlp", "mlp1", "scales"), (m + "experts.gate_up_proj_scales",), packed1[1:], "uint8"),
            _packed_rule(("blocks", "mlp", "mlp2", "blocks"), m + "experts.down_proj_blocks", packed2[:1]),
            Rule(("blocks", "mlp", "mlp2", "scales"), (m + "experts.down_proj_scales",), packed2[1:], "uint8"),
        ]
    else:  # dense HF experts are stored (E, in, out): transposed relative to ours
        rules += [
            Rule(("blocks", "mlp", "mlp1", "weight"), (m + "experts.gate_up_proj",), ((E, D, 2 * F),),
                 join=lambda xs: _swap_last(xs[0]), split=lambda x: [_swap_last(x)], slicing="swap_last"),
            Rule(("blocks", "mlp", "mlp2", "weight"), (m + "experts.down_proj",), ((E, F, D),),
                 join=lambda xs: _swap_last(xs[0]), split=lambda x: [_swap_last(x)], slicing="swap_last"),
        ]
    return rules


def _expected_tensors(rules: list[Rule], num_layers: int) -> dict[str, tuple[tuple[int, ...], str]]:
    out = {}
    for r in rules:
        for i in range(num_layers) if r.per_layer else [None]:
            for name, shape in zip(r.names, r.shapes):
                out[name.format(i=i)] = (shape, r.kind)
    return out


# ---- finding a checkpoint --------------------------------------------------------------------------------------
@dataclasses.dataclass
class Layout:
    """A checkpoint folder: its format, config, expert storage and where each tensor lives."""

    format: Format
    folder: Path
    config: ModelConfig
    experts: Literal["mxfp4", "dense"]
    tensor_files: dict[str, Path]


def find_layout(path: str | os.PathLike) -> Layout:
    """Detect the layout of `path`: original, HF (one file or sharded), or an HF snapshot root with original/."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint folder {root} does not exist or is not a folder")
    for folder in (root, root / "original"):
        if (folder / "config.json").is_file() and _safetensors_files(folder):
            return _read_layout(folder)
    if (root / "config.json").is_file():
        raise CheckpointError(f"{root} has a config.json but no *.safetensors weights (nor an original/ folder "
                              "that has both)")
    raise CheckpointError(f"{root} is neither checkpoint layout: expected config.json with *.safetensors files "
                          "(the original or the Hugging Face layout), or an original/ folder holding them")


def _safetensors_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.safetensors") if p.is_file())


def _load_json(path: Path) -> dict:
    try:
        return load_json(path)
    except ConfigError as e:  # invalid JSON is a bad checkpoint
        raise CheckpointError(str(e)) from None


def _read_layout(folder: Path) -> Layout:
    data = _load_json(folder / "config.json")
    fmt: Format = "hf" if "model_type" in data else "original"
    if fmt == "original" and "num_experts" not in data:
        raise CheckpointError(f"{folder / 'config.json'} is neither an original gpt-oss config (num_experts, ...) "
                              "nor a Hugging Face one (model_type: gpt_oss)")
    try:
        cfg = ModelConfig.from_json_dict(data, str(folder / "config.json"))
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    tensor_files = _tensor_files(folder)
    experts = "dense" if any(n.endswith("experts.gate_up_proj") for n in tensor_files) else "mxfp4"
    return Layout(fmt, folder, cfg, experts, tensor_files)


def _open(file: Path):
    try:
        return safe_open(str(file), framework="numpy")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file (truncated or corrupt?): {e}") from None


def _tensor_files(folder: Path) -> dict[str, Path]:
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = _load_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(f"{index}: expected a 'weight_map' object of tensor name -> file")
        files = {name: folder / f for name, f in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.is_file():
                raise CheckpointError(f"{index} names shard {f.name}, which is missing from {folder}")
        for f in sorted(set(files.values())):
            with _open(f) as st:
                held = set(st.keys())
            listed = [n for n, g in files.items() if g == f and n not in held]
            if listed:
                raise CheckpointError(f"{index} places {listed[:5]} in {f.name}, which does not hold them")
        return files
    files: dict[str, Path] = {}
    for f in _safetensors_files(folder):
        with _open(f) as st:
            for name in st.keys():
                if name in files:
                    raise CheckpointError(f"tensor {name!r} appears in both {files[name].name} and {f.name}")
                files[name] = f
    return files


def _validate(layout: Layout, rules: list[Rule]) -> None:
    cfg = layout.config
    expected = _expected_tensors(rules, cfg.num_hidden_layers)
    present = set(layout.tensor_files)
    layers = {int(m.group(1)) for n in present if (m := re.match(r"(?:block|model\.layers)\.(\d+)\.", n))}
    if layers and layers != set(range(cfg.num_hidden_layers)):
        raise CheckpointError(
            f"{layout.folder / 'config.json'} says num_hidden_layers={cfg.num_hidden_layers}, but the tensors are "
            f"for layers {_ranges(sorted(layers))}: the config disagrees with the tensors")
    missing = sorted(set(expected) - present)
    if missing:
        raise CheckpointError(f"{layout.folder}: {len(missing)} tensor(s) missing from the {layout.format} layout: "
                              f"{_shortlist(missing)}")
    unexpected = sorted(present - set(expected))
    if unexpected:
        raise CheckpointError(f"{layout.folder}: {len(unexpected)} unexpected tensor(s) for the {layout.format} "
                              f"layout: {_shortlist(unexpected)}")
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        by_file.setdefault(layout.tensor_files[name], []).append(name)
    for file, names in by_file.items():
        with _open(file) as st:
            for name in names:
                shape, kind = expected[name]
                sl = st.get_slice(name)
                got_shape, got_dtype = tuple(sl.get_shape()), sl.get_dtype()
                if got_shape != shape:
                    raise CheckpointError(
                        f"{file.name}: tensor {name!r} has shape {got_shape}, expected {shape} from "
                        f"{layout.folder / 'config.json'} ({_config_hint(cfg)}); the config disagrees with the "
                        "tensors or the file is not this model's")
                ok = got_dtype == "U8" if kind == "uint8" else got_dtype in FLOAT_DTYPES
                if not ok:
                    want = "U8 (packed MXFP4)" if kind == "uint8" else "one of " + "/".join(FLOAT_DTYPES)
                    raise CheckpointError(f"{file.name}: tensor {name!r} has dtype {got_dtype}, expected {want}")


def _config_hint(cfg: ModelConfig) -> str:
    return (f"hidden_size={cfg.hidden_size}, vocab_size={cfg.vocab_size}, num_experts={cfg.num_experts}, "
            f"intermediate_size={cfg.intermediate_size}, heads={cfg.num_attention_heads}/"
            f"{cfg.num_key_value_heads}x{cfg.head_dim}")


def _shortlist(names: list[str], n: int = 12) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")


def _ranges(xs: list[int]) -> str:
    return f"{xs[0]}..{xs[-1]}" if xs == list(range(xs[0], xs[-1] + 1)) else str(xs)


# ---- loading ---------------------------------------------------------------------------------------------------
class _Reader(contextlib.ExitStack):
    """`read(name)` -> numpy tensor, opening each file of the layout once; counts bytes on an optional bar."""

    def __init__(self, layout: Layout, bar=None):
        super().__init__()
        self._layout, self._bar, self._handles = layout, bar, {}

    def __enter__(self):
        super().__enter__()
        return self

    def _handle(self, name: str):
        file = self._layout.tensor_files[name]
        if file not in self._handles:
            self._handles[file] = self.enter_context(_open(file))
        return file, self._handles[file]

    def __call__(self, name: str) -> np.ndarray:
        file, handle = self._handle(name)
        try:
            x = handle.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{file}: cannot read tensor {name!r} (truncated or corrupt?): {e}") from None
        if self._bar is not None:
            self._bar.update(x.nbytes)
        return x

    def read_slice(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """Only `tensor[index]` (a tuple of slices) of the file's tensor: the bytes this process's devices need."""
        file, handle = self._handle(name)
        try:
            return handle.get_slice(name)[index]
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{file}: cannot read tensor {name!r} (truncated or corrupt?): {e}") from None

    def tensor_bytes(self, name: str) -> int:
        _, handle = self._handle(name)
        sl = handle.get_slice(name)
        return math.prod(sl.get_shape()) * {"U8": 1, "BF16": 2, "F16": 2, "F32": 4}.get(sl.get_dtype(), 1)

    def done(self, names) -> None:
        """Advance the progress bar by these whole tensors (a sharded load reads only parts of them)."""
        if self._bar is not None:
            self._bar.update(sum(self.tensor_bytes(n) for n in names))


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
    stored_rules = tensor_rules(cfg, layout.format, layout.experts)
    _validate(layout, stored_rules)
    target = layout.experts if experts == "auto" else experts
    abstract = nnx.eval_shape(lambda: Transformer(cfg, dtype=dtype, experts=target, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    leaves = dict(nnx.to_flat_state(state))
    placement = {} if mesh is None else dict(variable_shardings(abstract, mesh))
    total = _expected_bytes(stored_rules, cfg)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {layout.folder.name}",
              disable=not progress) as bar, _Reader(layout, bar) as read:
        assemble = _assemble if mesh is None else _assemble_sharded
        for path_, value in assemble(stored_rules, cfg, read, target, dtype, placement.get):
            leaves[path_].set_value(value)
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def _expected_bytes(rules: list[Rule], cfg: ModelConfig) -> int:
    """Bytes of the tensors `rules` describe, at bf16 for floats (a progress bar's total)."""
    return sum(sum(math.prod(s) for s in r.shapes) * (1 if r.kind == "uint8" else 2)
               * (cfg.num_hidden_layers if r.per_layer else 1) for r in rules)


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(buf, x, i):
    """buf[i] = x in place, so a stacked parameter is filled without a second copy."""
    return buf.at[i].set(x.astype(buf.dtype))


def _assemble(rules: list[Rule], cfg: ModelConfig, read, target: str, dtype, place=lambda path: None):
    """Yield (our flat path, device array) for every parameter, reading the checkpoint one tensor at a time.
    `place(path)` is the parameter's sharding (None: the default device)."""
    by_path = {r.path: r for r in rules}
    experts = [("mlp1",), ("mlp2",)]
    for r in rules:
        if r.path[-1] in ("blocks", "scales", "weight"):
            continue  # experts are assembled below, possibly converted
        load = lambda i, r=r: r.join([read(n.format(i=i)) for n in r.names])  # noqa: E731
        yield r.path, _stack(cfg, r.per_layer, load, jnp.uint8 if r.kind == "uint8" else dtype, place(r.path))
    for (which,) in experts:
        base = ("blocks", "mlp", which)
        if base + ("weight",) in by_path:  # dense in the checkpoint
            r = by_path[base + ("weight",)]
            load = lambda i, r=r: r.join([read(r.names[0].format(i=i))])  # noqa: E731
            if target == "dense":
                yield base + ("weight",), _stack(cfg, True, load, dtype, place(base + ("weight",)))
            else:
                codes = lambda i, load=load: mxfp4.encode(np.asarray(load(i), np.float32))  # noqa: E731
                yield from _packed_from(cfg, base, codes, place)
        else:
            rb, rs = by_path[base + ("blocks",)], by_path[base + ("scales",)]
            codes = lambda i, rb=rb, rs=rs: mxfp4.Packed(rb.join([read(rb.names[0].format(i=i))]),  # noqa: E731
                                                         read(rs.names[0].format(i=i)))
            if target == "dense":
                decode = lambda i, codes=codes: np.asarray(mxfp4.decode(*codes(i), jnp.float32))  # noqa: E731
                yield base + ("weight",), _stack(cfg, True, decode, dtype, place(base + ("weight",)))
            else:
                yield from _packed_from(cfg, base, codes, place)


def _packed_from(cfg, base, codes, place):
    # Each layer's codes are read once and split into the two buffers.
    L = cfg.num_hidden_layers
    blocks_buf = scales_buf = None
    for i in range(L):
        p = codes(i)
        if blocks_buf is None:
            blocks_buf = _zeros((L, *p.blocks.shape), jnp.uint8, place(base + ("blocks",)))
            scales_buf = _zeros((L, *p.scales.shape), jnp.uint8, place(base + ("scales",)))
        blocks_buf = _set_layer(blocks_buf, jnp.asarray(p.blocks), i)
        scales_buf = _set_layer(scales_buf, jnp.asarray(p.scales), i)
    yield base + ("blocks",), blocks_buf
    yield base + ("scales",), scales_buf


def _stack(cfg: ModelConfig, per_layer: bool, load: Callable[[int | None], np.ndarray], target_dtype,
           sharding=None) -> jax.Array:
    if not per_layer:
        x = np.asarray(load(None)).astype(jnp.dtype(target_dtype), copy=False)  # the embeddings: 1.2 GB each
        return jnp.asarray(x) if sharding is None else jax.device_put(x, sharding)  # each device its slice
    buf = None
    for i in range(cfg.num_hidden_layers):
        x = load(i)
        if buf is None:
            buf = _zeros((cfg.num_hidden_layers, *x.shape), target_dtype, sharding)
        buf = _set_layer(buf, x, i)
    return buf


def _zeros(shape, dtype, sharding) -> jax.Array:
    """A zero buffer, created already sharded when a sharding is given (never whole on one device)."""
    if sharding is None:
        return jnp.zeros(shape, dtype)
    return jax.jit(functools.partial(jnp.zeros, shape, dtype), out_shardings=sharding)()


# ---- sharded loading: each process reads only its devices' slices ------------------------------------------------
def _bounds(index, shape) -> tuple[slice, ...]:
    """`index` (from `jax.make_array_from_callback`) with every slice's start and stop made explicit."""
    return tuple(slice(*s.indices(d)[:2]) for s, d in zip(index, shape))


def _read_region(rule: Rule, read: _Reader, i: int | None, index: tuple[slice, ...]) -> np.ndarray:
    """`rule.join(layer i's tensors)[index]` (explicit slices), reading only that part of the file(s)."""
    names = [n.format(i=i) for n in rule.names]
    if rule.slicing == "same":
        return read.read_slice(names[0], index)
    if rule.slicing == "swap_last":
        return _swap_last(read.read_slice(names[0], (*index[:-2], index[-1], index[-2])))
    if rule.slicing == "concat0":
        rows, parts, offset = index[0], [], 0
        for name, shape in zip(names, rule.shapes):
            lo, hi = max(rows.start, offset), min(rows.stop, offset + shape[0])
            if lo < hi:
                parts.append(read.read_slice(name, (slice(lo - offset, hi - offset), *index[1:])))
            offset += shape[0]
        return np.concatenate(parts)
    if rule.slicing == "packed":  # ours [..., rows, cols/2] is the file's [..., rows, cols/32, 16]
        cols = index[-1]
        g0, g1 = cols.start // 16, -(-cols.stop // 16)
        x = read.read_slice(names[0], (*index[:-1], slice(g0, g1), slice(None)))
        return x.reshape(*x.shape[:-2], -1)[..., cols.start - 16 * g0: cols.stop - 16 * g0]
    raise AssertionError(rule.slicing)


def _layer_array(shape, sharding, region, dtype) -> jax.Array:
    """A global array of `shape` placed with `sharding`, each of this process's devices filled from
    `region(explicit index)`; devices that hold the same part share one read."""
    cache: dict = {}

    def fill(index):
        key = tuple((s.start, s.stop) for s in _bounds(index, shape))
        if key not in cache:
            cache[key] = np.asarray(region(_bounds(index, shape))).astype(dtype, copy=False)
        return cache[key]

    return jax.make_array_from_callback(tuple(shape), sharding, fill)


def _drop_layer_axis(sharding):
    """The sharding of one layer of a stacked parameter (the layer axis is never split)."""
    spec = tuple(sharding.spec)
    assert not spec or spec[0] is None, spec
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec[1:]))


def _stack_sharded(cfg: ModelConfig, rule_names, per_layer: bool, shape, region, dtype, sharding, read) -> jax.Array:
    """A parameter of our `shape` (with the layer axis when `per_layer`) built layer by layer from `region(i,
    index)` reads, placed with `sharding`."""
    dtype = jnp.dtype(dtype)
    if not per_layer:
        x = _layer_array(shape, sharding, lambda idx: region(None, idx), dtype)
        read.done([n.format(i=None) for n in rule_names])
        return x
    buf = _zeros(tuple(shape), dtype, sharding)
    layer_sharding = _drop_layer_axis(sharding)
    for i in range(cfg.num_hidden_layers):
        x = _layer_array(shape[1:], layer_sharding, functools.partial(region, i), dtype)
        buf = _set_layer(buf, x, i)
        read.done([n.format(i=i) for n in rule_names])
    return buf


def _assemble_sharded(rules: list[Rule], cfg: ModelConfig, read: _Reader, target: str, dtype, place):
    """`_assemble` for a mesh: (our flat path, global array) for every parameter, each process reading only the
    parts of each tensor that its own devices hold."""
    by_path = {r.path: r for r in rules}
    D, F, E, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.num_hidden_layers
    lead = lambda r: (L,) if r.per_layer else ()  # noqa: E731
    for r in rules:
        if r.path[-1] in ("blocks", "scales", "weight"):
            continue  # experts are assembled below, possibly converted
        shape = (*lead(r), *(r.shapes[0] if r.slicing != "concat0" else
                             (sum(s[0] for s in r.shapes), *r.shapes[0][1:])))
        region = lambda i, idx, r=r: _read_region(r, read, i, idx)  # noqa: E731
        yield r.path, _stack_sharded(cfg, r.names, r.per_layer, shape, region,
                                     jnp.uint8 if r.kind == "uint8" else dtype, place(r.path), read)
    for which, out, inp in (("mlp1", 2 * F, D), ("mlp2", D, F)):
        base = ("blocks", "mlp", which)
        if base + ("weight",) in by_path:  # dense in the checkpoint
            r = by_path[base + ("weight",)]
            dense = lambda i, idx, r=r: _read_region(r, read, i, idx)  # noqa: E731
            if target == "dense":
                yield base + ("weight",), _stack_sharded(cfg, r.names, True, (L, E, out, inp), dense, dtype,
                                                         place(base + ("weight",)), read)
                continue
            # encode whole 32-element groups of the dense rows, keep the slice asked for
            def blocks(i, idx, dense=dense):
                c = idx[-1]
                g0, g1 = c.start // 16, -(-c.stop // 16)
                codes = mxfp4.encode(np.asarray(dense(i, (*idx[:-1], slice(32 * g0, 32 * g1))), np.float32))
                return codes.blocks[..., c.start - 16 * g0: c.stop - 16 * g0]

            def scales(i, idx, dense=dense):
                c = idx[-1]
                return mxfp4.encode(np.asarray(dense(i, (*idx[:-1], slice(32 * c.start, 32 * c.stop))),
                                               np.float32)).scales
            names = r.names
            yield base + ("blocks",), _stack_sharded(cfg, (), True, (L, E, out, inp // 2), blocks, jnp.uint8,
                                                     place(base + ("blocks",)), read)
            yield base + ("scales",), _stack_sharded(cfg, names, True, (L, E, out, inp // 32), scales, jnp.uint8,
                                                     place(base + ("scales",)), read)
            continue
        rb, rs = by_path[base + ("blocks",)], by_path[base + ("scales",)]
        if target == "dense":
            def decode(i, idx, rb=rb, rs=rs):
                c = idx[-1]  # decode whole 32-element groups, keep the slice asked for
                g0, g1 = c.start // 32, -(-c.stop // 32)
                codes = _read_region(rb, read, i, (*idx[:-1], slice(16 * g0, 16 * g1)))
                scale = _read_region(rs, read, i, (*idx[:-1], slice(g0, g1)))
                return mxfp4.decode_np(codes, scale)[..., c.start - 32 * g0: c.stop - 32 * g0]
            yield base + ("weight",), _stack_sharded(cfg, rb.names + rs.names, True, (L, E, out, inp), decode,
                                                     dtype, place(base + ("weight",)), read)
        else:
            for r, width in ((rb, inp // 2), (rs, inp // 32)):
                region = lambda i, idx, r=r: _read_region(r, read, i, idx)  # noqa: E731
                yield r.path, _stack_sharded(cfg, r.names, True, (L, E, out, width), region, jnp.uint8,
                                             place(r.path), read)


# ---- converting -------------------------------------------------------------------------------------------------
class _LazyParams:
    """Our flat parameters read on demand from a checkpoint: `params[path][i]` is layer i as numpy."""

    def __init__(self, rules: list[Rule], read: Callable[[str], np.ndarray]):
        self._rules = {r.path: r for r in rules}
        self._read = read

    def __contains__(self, path) -> bool:
        return path in self._rules

    def __getitem__(self, path) -> _LazyStack:
        return _LazyStack(self._rules[path], self._read)


@dataclasses.dataclass
class _LazyStack:
    rule: Rule
    read: Callable[[str], np.ndarray]

    def __getitem__(self, i: int | None) -> np.ndarray:
        return self.rule.join([self.read(n.format(i=i)) for n in self.rule.names])

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self[None], dtype=dtype)


def convert_checkpoint(src: str | os.PathLike, dest: str | os.PathLike, format: Format, *,
                       experts: Literal["mxfp4", "bf16"] = "mxfp4", overwrite: bool = False,
                       max_shard_bytes: int = 2 << 30, progress: bool = True) -> Path:
    """Rewrite a checkpoint in another layout file to file, one tensor at a time (never the whole model in memory).

    MXFP4 bytes are copied unchanged; bf16 tensors stay bf16, so mxfp4 -> mxfp4 conversions are lossless.
    """
    layout = find_layout(src)
    rules = tensor_rules(layout.config, layout.format, layout.experts)
    _validate(layout, rules)
    with _Reader(layout) as read:
        return _save(_LazyParams(rules, read), layout.config, dest, format, experts, overwrite, max_shard_bytes,
                     progress)


class _RandomParams:
    """Random parameters made one layer at a time (the same distribution as `init_model`), for writing a
    checkpoint of any size without holding the model in memory. `params[path][i]` is layer i as numpy."""

    def __init__(self, cfg: ModelConfig, seed: int):
        self.cfg, self.seed = cfg, seed
        self._cached: tuple[int | None, dict] = (None, {})

    def _make(self, i: int | None) -> dict:
        rngs = nnx.Rngs(jax.random.fold_in(jax.random.key(self.seed), 0 if i is None else i + 1))
        if i is None:
            emb, norm, unemb = non_block_params(self.cfg, jnp.bfloat16, rngs)
            return {("embedding",): emb, ("norm", "scale"): norm.scale, ("unembedding",): unemb}
        block = Block(self.cfg, jnp.bfloat16, "mxfp4", rngs)
        return {("blocks", *p): v for p, v in nnx.to_flat_state(nnx.state(block))}

    def values(self, i: int | None) -> dict:
        if self._cached[0] != i or not self._cached[1]:
            self._cached = (i, {p: np.asarray(v.get_value()) for p, v in self._make(i).items()})
        return self._cached[1]

    def __contains__(self, path) -> bool:
        return path[0] != "blocks" or path[-1] != "weight"  # experts are made packed

    def __getitem__(self, path) -> _RandomStack:
        return _RandomStack(self, path)


@dataclasses.dataclass
class _RandomStack:
    params: _RandomParams
    path: tuple[str, ...]

    def __getitem__(self, i: int) -> np.ndarray:
        return self.params.values(i)[self.path]

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.params.values(None)[self.path], dtype=dtype)


def write_random_checkpoint(cfg: ModelConfig, path: str | os.PathLike, format: Format = "original", *, seed: int = 0,
                            overwrite: bool = False, max_shard_bytes: int = 2 << 30, progress: bool = True) -> Path:
    """A random-weight checkpoint (MXFP4 experts) streamed to disk layer by layer: a 20b or 120b never needs to
    fit in memory. Same distribution as `init_model`, not the same values."""
    return _save(_RandomParams(cfg, seed), cfg, path, format, "mxfp4", overwrite, max_shard_bytes, progress)


# ---- saving ----------------------------------------------------------------------------------------------------
def save_checkpoint(model: Transformer, path: str | os.PathLike, format: Format = "original", *,
                    experts: Literal["mxfp4", "bf16"] = "mxfp4", overwrite: bool = False,
                    max_shard_bytes: int = 2 << 30, progress: bool = True) -> Path:
    """Write `model` as a checkpoint the official tools load: non-expert tensors in bf16, experts MXFP4.

    experts="bf16" (HF format only) writes dense bf16 experts instead. Shards of at most `max_shard_bytes` (with
    model.safetensors.index.json when there are several). The folder appears only once complete.
    """
    leaves = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}
    return _save(leaves, model.config, path, format, experts, overwrite, max_shard_bytes, progress)


def _save(leaves, cfg: ModelConfig, path, format: Format, experts: str, overwrite: bool, max_shard_bytes: int,
          progress: bool) -> Path:
    if format not in ("original", "hf"):
        raise ValueError(f"format must be 'original' or 'hf', got {format!r}")
    if experts not in ("mxfp4", "bf16"):
        raise ValueError(f"experts must be 'mxfp4' or 'bf16', got {experts!r}")
    if experts == "bf16" and format == "original":
        raise ValueError("the original layout stores experts only as MXFP4; use format='hf' for bf16 experts")
    dest = Path(path)
    if dest.exists() and any(dest.iterdir()) and not overwrite:
        raise FileExistsError(f"{dest} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    rules = tensor_rules(cfg, format, "dense" if experts == "bf16" else "mxfp4")
    tmp = dest.parent / f".{dest.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        with tqdm(total=_expected_bytes(rules, cfg), unit="B", unit_scale=True, desc=f"writing {dest.name}",
                  disable=not progress) as bar:
            shards = _write_shards(tmp, _tensors_to_save(rules, cfg, leaves), max_shard_bytes, bar)
        config = cfg.to_original_json() if format == "original" else cfg.to_hf_json()
        if experts == "bf16":
            config.pop("quantization_config")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if len(shards) > 1:
            _write_index(tmp, shards)
        _replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _tensors_to_save(rules: list[Rule], cfg: ModelConfig, leaves):
    """Yield (name, numpy array) in file order: globals first, then layer by layer."""
    for r in rules:
        if not r.per_layer:
            yield r.names[0], _to_file_dtype(np.asarray(leaves[r.path]), r.kind)
    for i in range(cfg.num_hidden_layers):
        packed_cache: dict[str, mxfp4.Packed] = {}
        for r in (r for r in rules if r.per_layer):
            for name, x in zip(r.names, r.split(_layer_value(r, leaves, i, packed_cache))):
                yield name.format(i=i), _to_file_dtype(x, r.kind)


def _layer_value(rule: Rule, leaves, i: int, packed_cache) -> np.ndarray:
    """Our layer-i value for `rule`, converting the experts between packed and dense as the file needs."""
    if rule.path in leaves:
        return np.asarray(leaves[rule.path][i])
    base, part = rule.path[:-1], rule.path[-1]
    if part == "weight":  # file wants dense, model holds packed
        return np.asarray(mxfp4.decode(leaves[base + ("blocks",)][i], leaves[base + ("scales",)][i], jnp.float32))
    key = "/".join(base)  # file wants packed, model holds dense: encode once for blocks and scales
    if key not in packed_cache:
        packed_cache[key] = mxfp4.encode(np.asarray(leaves[base + ("weight",)][i], np.float32))
    return getattr(packed_cache[key], part)


def _to_file_dtype(x: np.ndarray, kind: str) -> np.ndarray:
    return np.ascontiguousarray(x.astype(np.uint8 if kind == "uint8" else ml_dtypes.bfloat16))


def _write_shards(folder: Path, tensors, max_shard_bytes: int, bar) -> list[tuple[str, list[str]]]:
    shards: list[tuple[str, list[str]]] = []
    pending: dict[str, np.ndarray] = {}
    size = 0

    def flush():
        nonlocal pending, size
        name = f"shard-{len(shards):05d}.safetensors"
        save_file(pending, str(folder / name), metadata={"format": "pt"})
        shards.append((name, list(pending)))
        pending, size = {}, 0

    for name, x in tensors:
        if pending and size + x.nbytes > max_shard_bytes:
            flush()
        pending[name] = x
        size += x.nbytes
        bar.update(x.nbytes)
    if pending:
        flush()
    n = len(shards)
    final = ["model.safetensors"] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    for (tmp_name, names), new in zip(shards, final):
        (folder / tmp_name).rename(folder / new)
    return [(new, names) for new, (_, names) in zip(final, shards)]


def _write_index(folder: Path, shards: list[tuple[str, list[str]]]) -> None:
    total = sum((folder / f).stat().st_size for f, _ in shards)
    index = {"metadata": {"total_size": total}, "weight_map": {n: f for f, names in shards for n in names}}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _replace(tmp: Path, dest: Path) -> None:
    if dest.exists():
        old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
        dest.rename(old)
        tmp.rename(dest)
        shutil.rmtree(old)
    else:
        tmp.rename(dest)
