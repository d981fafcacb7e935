"""Export a fine-tuning run to the official layouts, experts re-encoded to MXFP4 (or kept bf16 in the HF layout)."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptoss_jax import mxfp4
from gptoss_jax.checkpoint import load_model, save_checkpoint
from gptoss_jax.train.config import RUN_FILE
from gptoss_jax.train.trainer import load_run
from gptoss_jax.train.vocab import CompactVocab, expand


def quantization_error(model) -> dict[str, float]:
    """Relative RMS error ||w - decode(encode(w))|| / ||w|| of MXFP4 re-encoding, per expert matrix (all layers)."""
    errors = {}
    for path, leaf in nnx.to_flat_state(nnx.state(model)):
        if path[-1] != "weight":
            continue
        w = np.asarray(leaf.get_value(), np.float32)
        err = norm = 0.0
        for layer in w:  # one layer at a time bounds host memory
            packed = mxfp4.encode(layer)
            q = mxfp4.decode_np(packed.blocks, packed.scales)
            err += float(np.sum((layer - q) ** 2))
            norm += float(np.sum(layer**2))
        errors[".".join(map(str, path[-2:-1]))] = (err / max(norm, 1e-30)) ** 0.5
    return errors


def export_run(run_dir: str | Path, out: str | Path, format: str, *, experts: str = "mxfp4",
               overwrite: bool = False) -> tuple[Path, dict[str, float]]:
    """Write the newest checkpoint of a run in `format` ("hf" | "original"); returns the folder and, for MXFP4
    experts, the re-encoding error per expert matrix."""
    model = load_run(run_dir, jnp.float32)
    vocab = CompactVocab.load(Path(run_dir))
    if vocab is not None:  # a compact-vocabulary run: the full vocabulary back, unread rows from the start
        source = json.loads((Path(run_dir) / RUN_FILE).read_text())["checkpoint"]
        model = expand(model, vocab, load_model(source, jnp.float32, progress=False).embedding[...])
    errors = quantization_error(model) if experts == "mxfp4" else {}
    return save_checkpoint(model, out, format, experts=experts, overwrite=overwrite), errors
