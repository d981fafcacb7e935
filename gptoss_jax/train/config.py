"""The fine-tuning configuration (light: the CLI builds its flags from it without importing JAX)."""

from __future__ import annotations

import dataclasses

from gptoss_jax.config import REMAT_MODES

RUN_FILE = "run.json"  # a run folder's configuration: what marks a folder as a fine-tuning run
# Fields that may differ when a run is resumed. A different --steps reshapes the cosine schedule from there on.
RESUMABLE_FIELDS = ("steps", "save_every", "keep", "eval_every", "tensorboard", "progress")


class RunError(ValueError):
    """The run folder or the training configuration is inconsistent."""


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Everything a fine-tuning run needs; `gptoss-jax finetune` fills it from its flags."""

    checkpoint: str
    data: str
    out: str
    steps: int = 100
    batch_size: int = 8
    seq_len: int = 2048
    lr: float = 1e-5
    warmup: int = 10
    weight_decay: float = 0.0
    grad_accum: int = 1
    save_every: int = 50
    keep: int = 3
    eval_data: str | None = None
    eval_every: int = 50
    seed: int = 0
    remat: str = "full"
    clip_norm: float = 1.0
    min_lr_ratio: float = 0.1
    dtype: str = "bfloat16"
    compact_vocab: bool = False  # train in the data's own tokens plus one tied row (gptoss_jax.train.vocab)
    tensorboard: bool = False
    progress: bool = True

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "save_every", "keep", "eval_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise RunError(f"{name} must be a positive integer, got {value!r}")
        if self.warmup < 0:
            raise RunError(f"warmup must be >= 0, got {self.warmup}")
        if not self.lr > 0:
            raise RunError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise RunError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.remat not in REMAT_MODES:
            raise RunError(f"remat must be one of {REMAT_MODES}, got {self.remat!r}")
        if self.dtype not in ("bfloat16", "float32"):
            raise RunError(f"dtype must be bfloat16 or float32, got {self.dtype!r}")
