"""Rewriting a checkpoint in another layout, file to file, one tensor at a time."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from gptoss_jax.checkpoint.files import Reader
from gptoss_jax.checkpoint.layout import Format, find_layout, tensor_rules, whole
from gptoss_jax.checkpoint.save import write
from gptoss_jax.checkpoint.validate import validate


def convert_checkpoint(src: str | os.PathLike, dest: str | os.PathLike, format: Format, *,
                       experts: Literal["mxfp4", "bf16"] = "mxfp4", overwrite: bool = False,
                       max_shard_bytes: int = 2 << 30, progress: bool = True) -> Path:
    """Rewrite a checkpoint in another layout file to file, one tensor at a time (never the whole model in memory).

    MXFP4 bytes are copied unchanged; bf16 tensors stay bf16, so mxfp4 -> mxfp4 conversions are lossless.
    """
    layout = find_layout(src)
    rules = tensor_rules(layout.config, layout.format, layout.experts)
    validate(layout, rules)
    with Reader(layout.tensor_files) as read:
        params = {r.path: lambda i, r=r: r.region(read.read_slice, i, whole(r.shape)) for r in rules}
        return write(params, layout.config, dest, format, experts, overwrite, max_shard_bytes, progress)
