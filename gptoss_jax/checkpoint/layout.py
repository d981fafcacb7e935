"""The two on-disk layouts (docs/spec.md, "Checkpoint layouts"): which checkpoint tensors hold each parameter of
ours, and finding a checkpoint folder's layout and tensors.

Shapes and dtypes come from the model's abstract state, so the table names tensors and never restates a size.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptoss_jax.checkpoint.files import CheckpointError, load_json, open_file
from gptoss_jax.config import ConfigError, ModelConfig, read_checkpoint_config, safetensors_files
from gptoss_jax.model import Transformer

Format = Literal["original", "hf"]
Experts = Literal["mxfp4", "dense"]
INDEX_FILE = "model.safetensors.index.json"
EXPERTS = (("blocks", "mlp", "mlp1"), ("blocks", "mlp", "mlp2"))  # our expert matrices' paths (less the part)

# How our layer array maps to the file's tensors: "same" (the file's tensor as is), "packed" (MXFP4 codes: the
# file's [..., rows, cols/32, 16] held as [..., rows, cols/2], the same bytes), "concat0" (the names concatenated
# along axis 0), "swap_last" (the file's last two axes swapped: dense HF experts are stored (E, in, out)).
Codec = Literal["same", "packed", "concat0", "swap_last"]


@dataclasses.dataclass(frozen=True)
class Rule:
    """How one parameter of ours (a flat state path) maps to checkpoint tensors of one layout. `names` are
    templates with `{i}` for the layer; per-layer rules fill our leading layer axis one layer at a time."""

    path: tuple[str, ...]
    names: tuple[str, ...]
    shape: tuple[int, ...]  # ours, one layer
    kind: Literal["float", "uint8"]
    per_layer: bool
    codec: Codec
    rows: tuple[int, ...] = ()  # concat0: each name's rows

    @property
    def file_shapes(self) -> tuple[tuple[int, ...], ...]:
        s = self.shape
        if self.codec == "packed":
            return ((*s[:-1], s[-1] // 16, 16),)
        if self.codec == "swap_last":
            return ((*s[:-2], s[-1], s[-2]),)
        if self.codec == "concat0":
            return tuple((r, *s[1:]) for r in self.rows)
        return (s,)

    def split(self, x: np.ndarray) -> list[np.ndarray]:
        """Our layer array -> the file's tensors, in `names` order."""
        if self.codec == "packed":
            return [x.reshape(*x.shape[:-1], -1, 16)]
        if self.codec == "swap_last":
            return [np.swapaxes(x, -1, -2)]
        if self.codec == "concat0":
            return np.split(x, np.cumsum(self.rows)[:-1])
        return [x]

    def region(self, read_slice, i: int | None, index: tuple[slice, ...]) -> np.ndarray:
        """Our layer i's `[index]` (explicit slices), reading only that part of the file's tensors with
        `read_slice(name, index)`."""
        names = [n.format(i=i) for n in self.names]
        if self.codec == "same":
            return read_slice(names[0], index)
        if self.codec == "swap_last":
            return np.swapaxes(read_slice(names[0], (*index[:-2], index[-1], index[-2])), -1, -2)
        if self.codec == "concat0":
            rows, parts, offset = index[0], [], 0
            for name, n in zip(names, self.rows):
                lo, hi = max(rows.start, offset), min(rows.stop, offset + n)
                if lo < hi:
                    parts.append(read_slice(name, (slice(lo - offset, hi - offset), *index[1:])))
                offset += n
            return np.concatenate(parts)
        cols = index[-1]  # packed: whole 16-byte groups of the file, then the columns asked for
        g0, g1 = cols.start // 16, -(-cols.stop // 16)
        x = read_slice(names[0], (*index[:-1], slice(g0, g1), slice(None)))
        return x.reshape(*x.shape[:-2], -1)[..., cols.start - 16 * g0: cols.stop - 16 * g0]


def whole(shape) -> tuple[slice, ...]:
    """The index of a whole array of `shape`, as explicit slices."""
    return tuple(slice(0, d) for d in shape)


# (our path, checkpoint names, codec) in file order; our paths under "blocks" are per layer.
def _original_names(experts: Experts):
    a, m = "block.{i}.attn.", "block.{i}.mlp."
    return [
        (("embedding",), ("embedding.weight",), "same"),
        (("unembedding",), ("unembedding.weight",), "same"),
        (("norm", "scale"), ("norm.scale",), "same"),
        (("blocks", "attn", "norm", "scale"), (a + "norm.scale",), "same"),
        (("blocks", "attn", "qkv_w"), (a + "qkv.weight",), "same"),
        (("blocks", "attn", "qkv_b"), (a + "qkv.bias",), "same"),
        (("blocks", "attn", "out_w"), (a + "out.weight",), "same"),
        (("blocks", "attn", "out_b"), (a + "out.bias",), "same"),
        (("blocks", "attn", "sinks"), (a + "sinks",), "same"),
        (("blocks", "mlp", "norm", "scale"), (m + "norm.scale",), "same"),
        (("blocks", "mlp", "gate_w"), (m + "gate.weight",), "same"),
        (("blocks", "mlp", "gate_b"), (m + "gate.bias",), "same"),
        (("blocks", "mlp", "mlp1", "blocks"), (m + "mlp1_weight.blocks",), "packed"),
        (("blocks", "mlp", "mlp1", "scales"), (m + "mlp1_weight.scales",), "same"),
        (("blocks", "mlp", "mlp1_b"), (m + "mlp1_bias",), "same"),
        (("blocks", "mlp", "mlp2", "blocks"), (m + "mlp2_weight.blocks",), "packed"),
        (("blocks", "mlp", "mlp2", "scales"), (m + "mlp2_weight.scales",), "same"),
        (("blocks", "mlp", "mlp2_b"), (m + "mlp2_bias",), "same"),
    ]


def _hf_names(experts: Experts):
    a, m = "model.layers.{i}.self_attn.", "model.layers.{i}.mlp."
    table = [
        (("embedding",), ("model.embed_tokens.weight",), "same"),
        (("unembedding",), ("lm_head.weight",), "same"),
        (("norm", "scale"), ("model.norm.weight",), "same"),
        (("blocks", "attn", "norm", "scale"), ("model.layers.{i}.input_layernorm.weight",), "same"),
        (("blocks", "attn", "qkv_w"), tuple(a + f"{p}_proj.weight" for p in "qkv"), "concat0"),
        (("blocks", "attn", "qkv_b"), tuple(a + f"{p}_proj.bias" for p in "qkv"), "concat0"),
        (("blocks", "attn", "out_w"), (a + "o_proj.weight",), "same"),
        (("blocks", "attn", "out_b"), (a + "o_proj.bias",), "same"),
        (("blocks", "attn", "sinks"), (a + "sinks",), "same"),
        (("blocks", "mlp", "norm", "scale"), ("model.layers.{i}.post_attention_layernorm.weight",), "same"),
        (("blocks", "mlp", "gate_w"), (m + "router.weight",), "same"),
        (("blocks", "mlp", "gate_b"), (m + "router.bias",), "same"),
        (("blocks", "mlp", "mlp1_b"), (m + "experts.gate_up_proj_bias",), "same"),
        (("blocks", "mlp", "mlp2_b"), (m + "experts.down_proj_bias",), "same"),
    ]
    for base, stem in zip(EXPERTS, ("experts.gate_up_proj", "experts.down_proj")):
        if experts == "mxfp4":
            table += [(base + ("blocks",), (m + stem + "_blocks",), "packed"),
                      (base + ("scales",), (m + stem + "_scales",), "same")]
        else:
            table += [(base + ("weight",), (m + stem,), "swap_last")]
    return table


@functools.cache
def _abstract_params(cfg: ModelConfig, experts: Experts) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    model = nnx.eval_shape(lambda: Transformer(cfg, dtype=jnp.bfloat16, experts=experts, rngs=nnx.Rngs(0)))
    return {path: v.get_value() for path, v in nnx.to_flat_state(nnx.state(model))}


def tensor_rules(cfg: ModelConfig, fmt: Format, experts: Experts) -> list[Rule]:
    """Every parameter of a model with `experts` storage, as the `fmt` layout stores it, in file order."""
    if experts == "dense" and fmt == "original":
        raise CheckpointError("the original layout stores experts only as MXFP4")
    params = _abstract_params(cfg, experts)
    qkv_rows = tuple(n * cfg.head_dim for n in (cfg.num_attention_heads, cfg.num_key_value_heads,
                                                  cfg.num_key_value_heads))
    rules = []
    for path, names, codec in (_original_names if fmt == "original" else _hf_names)(experts):
        per_layer = path[0] == "blocks"
        p = params[path]
        rules.append(Rule(path, names, tuple(p.shape[1:] if per_layer else p.shape),
                          "uint8" if p.dtype == jnp.uint8 else "float", per_layer, codec,
                          qkv_rows if codec == "concat0" else ()))
    assert {r.path for r in rules} == set(params), "the layout table misses or invents a parameter"
    return rules


def file_bytes(rules: list[Rule], num_layers: int) -> int:
    """Bytes of the tensors `rules` describe, at bf16 for floats (a progress bar's total)."""
    return sum(sum(math.prod(s) for s in r.file_shapes) * (1 if r.kind == "uint8" else 2)
               * (num_layers if r.per_layer else 1) for r in rules)


# ---- finding a checkpoint --------------------------------------------------------------------------------------
@dataclasses.dataclass
class Layout:
    """A checkpoint folder: its format, config, expert storage and where each tensor lives."""

    format: Format
    folder: Path
    config: ModelConfig
    experts: Experts
    tensor_files: dict[str, Path]


def find_layout(path: str | os.PathLike) -> Layout:
    """Detect the layout of `path`: original, HF (one file or sharded), or an HF snapshot root with original/."""
    try:
        folder, fmt, cfg = read_checkpoint_config(path)
    except ConfigError as e:  # a bad config is a bad checkpoint
        raise CheckpointError(str(e)) from None
    tensor_files = _tensor_files(folder)
    experts = "dense" if any(n.endswith("experts.gate_up_proj") for n in tensor_files) else "mxfp4"
    return Layout(fmt, folder, cfg, experts, tensor_files)


def _tensor_files(folder: Path) -> dict[str, Path]:
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = load_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(f"{index}: expected a 'weight_map' object of tensor name -> file")
        files = {name: folder / f for name, f in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.is_file():
                raise CheckpointError(f"{index} names shard {f.name}, which is missing from {folder}")
        for f in sorted(set(files.values())):
            with open_file(f) as st:
                held = set(st.keys())
            listed = [n for n, g in files.items() if g == f and n not in held]
            if listed:
                raise CheckpointError(f"{index} places {listed[:5]} in {f.name}, which does not hold them")
        return files
    files: dict[str, Path] = {}
    for f in safetensors_files(folder):
        with open_file(f) as st:
            for name in st.keys():
                if name in files:
                    raise CheckpointError(f"tensor {name!r} appears in both {files[name].name} and {f.name}")
                files[name] = f
    return files
