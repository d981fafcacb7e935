"""Writing a checkpoint in either layout, atomically: the files go into a temporary folder beside the target,
renamed into place last, so a crash mid-save never leaves a folder that looks like a complete checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Literal

import ml_dtypes
import numpy as np
from flax import nnx
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from gptoss_jax.checkpoint import experts as expert_storage
from gptoss_jax.checkpoint.layout import EXPERTS, INDEX_FILE, Format, Rule, file_bytes, tensor_rules, whole
from gptoss_jax.config import ModelConfig
from gptoss_jax.model import Transformer

# Our flat path -> `value(layer)`: that parameter's layer as numpy (layer None: a parameter without layers).
Params = dict[tuple[str, ...], Callable[["int | None"], np.ndarray]]


def save_checkpoint(model: Transformer, path: str | os.PathLike, format: Format = "original", *,
                    experts: Literal["mxfp4", "bf16"] = "mxfp4", overwrite: bool = False,
                    max_shard_bytes: int = 2 << 30, progress: bool = True) -> Path:
    """Write `model` as a checkpoint the official tools load: non-expert tensors in bf16, experts MXFP4.

    experts="bf16" (HF format only) writes dense bf16 experts instead. Shards of at most `max_shard_bytes` (with
    model.safetensors.index.json when there are several). The folder appears only once complete.
    """
    params = {p: (lambda i, v=v.get_value(): np.asarray(v if i is None else v[i]))
              for p, v in nnx.to_flat_state(nnx.state(model))}
    return write(params, model.config, path, format, experts, overwrite, max_shard_bytes, progress)


def write(params: Params, cfg: ModelConfig, path, format: Format, experts: str, overwrite: bool,
          max_shard_bytes: int, progress: bool) -> Path:
    """`save_checkpoint` for parameters made on demand (`Params`), so that a writer can stream a model that is
    never whole in memory."""
    if format not in ("original", "hf"):
        raise ValueError(f"format must be 'original' or 'hf', got {format!r}")
    if experts not in ("mxfp4", "bf16"):
        raise ValueError(f"experts must be 'mxfp4' or 'bf16', got {experts!r}")
    if experts == "bf16" and format == "original":
        raise ValueError("the original layout stores experts only as MXFP4; use format='hf' for bf16 experts")
    dest = Path(path)
    if dest.exists() and any(dest.iterdir()) and not overwrite:
        raise FileExistsError(f"{dest} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    file_experts = "dense" if experts == "bf16" else "mxfp4"
    rules = tensor_rules(cfg, format, file_experts)
    tmp = dest.parent / f".{dest.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        with tqdm(total=file_bytes(rules, cfg.num_hidden_layers), unit="B", unit_scale=True,
                  desc=f"writing {dest.name}", disable=not progress) as bar:
            shards = _write_shards(tmp, _tensors(rules, cfg, params, file_experts), max_shard_bytes, bar)
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


def _tensors(rules: list[Rule], cfg: ModelConfig, params: Params, file_experts: str):
    """Yield (name, numpy array) in file order: globals first, then layer by layer, the experts converted to
    `file_experts` storage where the parameters hold the other."""
    for r in rules:
        if not r.per_layer:
            yield r.names[0], _to_file_dtype(params[r.path](None), r.kind)
    held = "dense" if EXPERTS[0] + ("weight",) in params else "mxfp4"
    regions = expert_storage.regions([r.path for r in rules], lambda p, i, index: params[p](i)[index], held,
                                     file_experts)
    for i in range(cfg.num_hidden_layers):
        for r in rules:
            if r.per_layer:
                for name, x in zip(r.names, r.split(np.asarray(regions[r.path](i, whole(r.shape))))):
                    yield name.format(i=i), _to_file_dtype(x, r.kind)


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
