"""Checking a checkpoint folder's tensors against its config before any data is read: names, shapes, dtypes."""

from __future__ import annotations

import re
from pathlib import Path

from gptoss_jax.checkpoint.files import CheckpointError, open_file
from gptoss_jax.checkpoint.layout import Layout, Rule
from gptoss_jax.config import ModelConfig

FLOAT_DTYPES = ("BF16", "F16", "F32")


def validate(layout: Layout, rules: list[Rule]) -> None:
    """Raise a CheckpointError naming the file, the tensor and what differs, for the first mismatch found."""
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
        with open_file(file) as st:
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


def _expected_tensors(rules: list[Rule], num_layers: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """Checkpoint tensor name -> (shape, kind), in file order."""
    out = {}
    for r in rules:
        for i in range(num_layers) if r.per_layer else [None]:
            for name, shape in zip(r.names, r.file_shapes):
                out[name.format(i=i)] = (shape, r.kind)
    return out


def _config_hint(cfg: ModelConfig) -> str:
    return (f"hidden_size={cfg.hidden_size}, vocab_size={cfg.vocab_size}, num_experts={cfg.num_experts}, "
            f"intermediate_size={cfg.intermediate_size}, heads={cfg.num_attention_heads}/"
            f"{cfg.num_key_value_heads}x{cfg.head_dim}")


def _shortlist(names: list[str], n: int = 12) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")


def _ranges(xs: list[int]) -> str:
    return f"{xs[0]}..{xs[-1]}" if xs == list(range(xs[0], xs[-1] + 1)) else str(xs)
