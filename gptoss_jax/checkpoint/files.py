"""Reading safetensors files: every failure is a `CheckpointError` that names the file and the tensor."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from gptoss_jax import config

FILE_DTYPE_BYTES = {"U8": 1, "BF16": 2, "F16": 2, "F32": 4}


class CheckpointError(ValueError):
    """A checkpoint folder or file is not what the config and layout require."""


def load_json(path: Path) -> dict:
    try:
        return config.load_json(path)
    except config.ConfigError as e:  # invalid JSON is a bad checkpoint
        raise CheckpointError(str(e)) from None


def open_file(file: Path):
    try:
        return safe_open(str(file), framework="numpy")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file (truncated or corrupt?): {e}") from None


class Reader(contextlib.ExitStack):
    """`read_slice(name, index)` -> part of a tensor as numpy, opening each file of a layout once; counts whole
    tensors' bytes on an optional progress bar (`done`)."""

    def __init__(self, tensor_files: dict[str, Path], bar=None):
        super().__init__()
        self._files, self._bar, self._handles = tensor_files, bar, {}

    def __enter__(self):
        super().__enter__()
        return self

    def _handle(self, name: str):
        file = self._files[name]
        if file not in self._handles:
            self._handles[file] = self.enter_context(open_file(file))
        return file, self._handles[file]

    def read_slice(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """Only `tensor[index]` (a tuple of slices) of the file's tensor: the bytes this process's devices need."""
        file, handle = self._handle(name)
        try:
            return handle.get_slice(name)[index]
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{file}: cannot read tensor {name!r} (truncated or corrupt?): {e}") from None

    def done(self, names) -> None:
        """Advance the progress bar by these whole tensors (a sharded load reads only parts of them)."""
        if self._bar is not None:
            self._bar.update(sum(self._tensor_bytes(n) for n in names))

    def _tensor_bytes(self, name: str) -> int:
        sl = self._handle(name)[1].get_slice(name)
        return math.prod(sl.get_shape()) * FILE_DTYPE_BYTES.get(sl.get_dtype(), 1)
