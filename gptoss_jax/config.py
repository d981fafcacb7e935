"""`ModelConfig`: the one description of a gpt-oss model. Presets are instances."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Literal

# The keys of the reference `gpt_oss.torch.model.ModelConfig`, in its order. The original layout's config.json
# holds exactly these: the reference builds its config with `ModelConfig(**json)` and refuses any other key.
ORIGINAL_CONFIG_KEYS = (
    "num_hidden_layers", "num_experts", "experts_per_token", "vocab_size", "hidden_size", "intermediate_size",
    "swiglu_limit", "head_dim", "num_attention_heads", "num_key_value_heads", "sliding_window",
    "initial_context_length", "rope_theta", "rope_scaling_factor", "rope_ntk_alpha", "rope_ntk_beta",
)
MXFP4_BLOCK = 32  # elements that share one E8M0 scale
KERNEL_MODES = ("auto", "xla", "pallas", "interpret-tpu", "interpret-gpu")
REMAT_MODES = ("none", "full", "dots", "dots_no_batch")  # per-layer rematerialization (model.REMAT_POLICIES)


class ConfigError(ValueError):
    """A config field is invalid or inconsistent."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    num_hidden_layers: int = 24
    num_experts: int = 32
    experts_per_token: int = 4
    vocab_size: int = 201088
    hidden_size: int = 2880
    intermediate_size: int = 2880
    swiglu_limit: float = 7.0
    head_dim: int = 64
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    sliding_window: int = 128  # keys seen by a query on even layers, itself included
    initial_context_length: int = 4096
    rope_theta: float = 150000.0
    rope_scaling_factor: float = 32.0
    rope_ntk_alpha: float = 1.0  # YaRN beta_slow
    rope_ntk_beta: float = 32.0  # YaRN beta_fast
    # Fixed in both references (not part of either config file's gpt-oss-specific keys).
    swiglu_alpha: float = 1.702
    rms_norm_eps: float = 1e-5
    # How attention and the expert matmuls run (not a checkpoint property): "auto" = the Pallas kernels on TPU and
    # GPU, the XLA twins elsewhere (the environment variable GPTOSS_KERNELS overrides "auto"); "xla"; "pallas";
    # "interpret-tpu" / "interpret-gpu" = a backend's kernels in Pallas interpret mode, on any device (tests).
    kernels: str = "auto"

    def __post_init__(self):
        positive = ("num_hidden_layers", "num_experts", "experts_per_token", "vocab_size", "hidden_size",
                    "intermediate_size", "head_dim", "num_attention_heads", "num_key_value_heads",
                    "initial_context_length")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by num_key_value_heads "
                f"({self.num_key_value_heads}) for grouped-query attention")
        if self.experts_per_token > self.num_experts:
            raise ConfigError(f"experts_per_token ({self.experts_per_token}) exceeds num_experts ({self.num_experts})")
        for name in ("hidden_size", "intermediate_size"):
            if getattr(self, name) % MXFP4_BLOCK:
                raise ConfigError(f"{name} ({getattr(self, name)}) must be a multiple of {MXFP4_BLOCK}: "
                                  "MXFP4 expert weights share one scale per 32 input features")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim ({self.head_dim}) must be even for the half-split rotary embedding")
        if not isinstance(self.sliding_window, int) or self.sliding_window < 0:
            raise ConfigError(f"sliding_window must be an integer >= 0 (0 disables it), got {self.sliding_window!r}")
        if self.rope_scaling_factor < 1.0:
            raise ConfigError(f"rope_scaling_factor must be >= 1, got {self.rope_scaling_factor}")
        if self.rope_scaling_factor > 1.0 and not self.rope_ntk_beta > self.rope_ntk_alpha > 0:
            raise ConfigError(f"YaRN needs rope_ntk_beta > rope_ntk_alpha > 0, got beta={self.rope_ntk_beta}, "
                              f"alpha={self.rope_ntk_alpha}")
        if self.kernels not in KERNEL_MODES:
            raise ConfigError(f"ModelConfig.kernels must be one of {KERNEL_MODES}, got {self.kernels!r}")
        for name in ("swiglu_limit", "rope_theta", "rms_norm_eps"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"ModelConfig.{name} must be > 0, got {getattr(self, name)!r}")

    # ---- presets -------------------------------------------------------------------------------------------
    @classmethod
    def gpt_oss_20b(cls) -> ModelConfig:
        return cls(num_hidden_layers=24, num_experts=32)

    @classmethod
    def gpt_oss_120b(cls) -> ModelConfig:
        return cls(num_hidden_layers=36, num_experts=128)

    @classmethod
    def tiny(cls) -> ModelConfig:
        """The full architecture at toy widths (fast on CPU) with the real vocabulary and window."""
        return cls(num_hidden_layers=2, num_experts=4, experts_per_token=2, hidden_size=64, intermediate_size=64,
                   head_dim=64, num_attention_heads=4, num_key_value_heads=2)

    @classmethod
    def demo(cls) -> ModelConfig:
        """`gptoss-demo` (gptoss_jax.demo): narrow enough that the vocabulary's two tables stay ~50 MB in bf16."""
        return cls(num_hidden_layers=4, num_experts=8, experts_per_token=2, hidden_size=64, intermediate_size=128,
                   head_dim=32, num_attention_heads=8, num_key_value_heads=2)

    @classmethod
    def preset(cls, name: str) -> ModelConfig:
        presets = {"20b": cls.gpt_oss_20b, "gpt-oss-20b": cls.gpt_oss_20b, "120b": cls.gpt_oss_120b,
                   "gpt-oss-120b": cls.gpt_oss_120b, "tiny": cls.tiny, "demo": cls.demo}
        if name not in presets:
            raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(presets)}")
        return presets[name]()

    # ---- derived -------------------------------------------------------------------------------------------
    @property
    def q_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def qkv_size(self) -> int:
        return self.head_dim * (self.num_attention_heads + 2 * self.num_key_value_heads)

    @property
    def max_position_embeddings(self) -> int:
        return int(self.initial_context_length * self.rope_scaling_factor)

    def layer_window(self, layer: int) -> int:
        """Keys a query sees on `layer` (0 = full causal): the window on even layers only."""
        return self.sliding_window if layer % 2 == 0 else 0

    # ---- config.json ---------------------------------------------------------------------------------------
    def to_original_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ORIGINAL_CONFIG_KEYS}

    def to_hf_json(self) -> dict[str, Any]:
        """What transformers writes for `GptOssConfig`, with MXFP4 experts."""
        out = {
            "architectures": ["GptOssForCausalLM"],
            "model_type": "gpt_oss",
            "attention_bias": True,
            "attention_dropout": 0.0,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "layer_types": ["sliding_attention" if self.layer_window(i) else "full_attention"
                            for i in range(self.num_hidden_layers)],
            "max_position_embeddings": self.max_position_embeddings,
            "num_attention_heads": self.num_attention_heads,
            "num_experts_per_tok": self.experts_per_token,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "num_local_experts": self.num_experts,
            "output_router_logits": False,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_scaling": self._hf_rope(),
            "rope_theta": self.rope_theta,
            "router_aux_loss_coef": 0.9,
            "sliding_window": self.sliding_window,
            "swiglu_limit": self.swiglu_limit,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "use_cache": True,
            "vocab_size": self.vocab_size,
            "quantization_config": {
                "quant_method": "mxfp4",
                "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                           "model.embed_tokens", "lm_head"],
            },
        }
        # The Harmony ids of <|return|> and <|endoftext|>; transformers requires the pad id inside the vocab.
        if self.vocab_size > 200002:
            out |= {"eos_token_id": 200002, "pad_token_id": 199999}
        return out

    def _hf_rope(self) -> dict[str, Any]:
        return {"rope_type": "yarn", "factor": self.rope_scaling_factor, "beta_fast": self.rope_ntk_beta,
                "beta_slow": self.rope_ntk_alpha, "original_max_position_embeddings": self.initial_context_length,
                "truncate": False}

    @classmethod
    def from_json_dict(cls, data: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Either layout's config.json (HF when it has `model_type`)."""
        if data.get("model_type") not in (None, "gpt_oss"):
            raise ConfigError(f"{source}: model_type is {data['model_type']!r}, expected 'gpt_oss'")
        return cls._from_hf(data, source) if "model_type" in data else cls._from_original(data, source)

    @classmethod
    def _from_original(cls, data, source):
        missing = [k for k in ORIGINAL_CONFIG_KEYS if k not in data]
        if missing:
            raise ConfigError(f"{source}: missing field(s) {missing} of the original gpt-oss config")
        unknown = sorted(set(data) - set(ORIGINAL_CONFIG_KEYS))
        if unknown:
            raise ConfigError(f"{source}: unknown field(s) {unknown}; the original layout's config.json holds "
                              f"only {list(ORIGINAL_CONFIG_KEYS)}")
        return cls(**{k: _typed(cls, k, data[k], source) for k in ORIGINAL_CONFIG_KEYS})

    @classmethod
    def _from_hf(cls, data, source):
        rope = data.get("rope_scaling") or data.get("rope_parameters") or {}
        if rope and rope.get("rope_type", rope.get("type")) != "yarn":
            raise ConfigError(f"{source}: rope scaling type {rope.get('rope_type')!r}; gpt-oss uses 'yarn'")
        if rope.get("truncate", False):
            raise ConfigError(f"{source}: rope scaling has truncate=true; gpt-oss's YaRN ramp is not rounded")
        fields = {
            "num_hidden_layers": data.get("num_hidden_layers"),
            "num_experts": data.get("num_local_experts"),
            "experts_per_token": data.get("num_experts_per_tok"),
            "vocab_size": data.get("vocab_size"),
            "hidden_size": data.get("hidden_size"),
            "intermediate_size": data.get("intermediate_size"),
            "swiglu_limit": data.get("swiglu_limit", 7.0),
            "head_dim": data.get("head_dim"),
            "num_attention_heads": data.get("num_attention_heads"),
            "num_key_value_heads": data.get("num_key_value_heads"),
            "sliding_window": data.get("sliding_window") or 0,
            "initial_context_length": rope.get("original_max_position_embeddings", 4096),
            "rope_theta": data.get("rope_theta", rope.get("rope_theta", 150000.0)),
            "rope_scaling_factor": rope.get("factor", 1.0),
            "rope_ntk_alpha": rope.get("beta_slow", 1.0),
            "rope_ntk_beta": rope.get("beta_fast", 32.0),
            "rms_norm_eps": data.get("rms_norm_eps", 1e-5),
        }
        missing = [k for k, v in fields.items() if v is None]
        if missing:
            raise ConfigError(f"{source}: missing field(s) for {missing}")
        cfg = cls(**{k: _typed(cls, k, v, source) for k, v in fields.items()})
        layer_types = data.get("layer_types")
        if layer_types is not None:
            expected = ["sliding_attention" if cfg.layer_window(i) else "full_attention"
                        for i in range(cfg.num_hidden_layers)]
            if list(layer_types) != expected:
                raise ConfigError(f"{source}: layer_types {layer_types} differ from gpt-oss's pattern (sliding "
                                  f"window on even layers, full attention on odd layers): {expected}")
        return cfg

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike) -> ModelConfig:
        """The config of a checkpoint folder in either layout (or an HF snapshot root holding `original/`); a folder
        that holds no checkpoint is a ConfigError (`gj.load_model` and `gj.find_layout` say CheckpointError)."""
        return read_checkpoint_config(path)[2]


def _typed(cls, name: str, value: Any, source: str):
    kind = {f.name: f.type for f in dataclasses.fields(cls)}[name]
    if kind == "int":
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{source}: field {name} must be an integer, got {value!r}")
        return value
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ConfigError(f"{source}: field {name} must be a number, got {value!r}")
    return float(value)


def load_json(path: str | os.PathLike) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_checkpoint_config(path: str | os.PathLike) -> tuple[Path, Literal["original", "hf"], ModelConfig]:
    """(folder, layout, config) of the checkpoint at `path`: the folder itself, or its original/ (an HF snapshot
    root), whichever first holds config.json beside *.safetensors weights.

    It lives here, not in `gptoss_jax.checkpoint` (which reads the tensors and turns these errors into
    CheckpointErrors), so that config depends on nothing of ours.
    """
    root = Path(path)
    if not root.is_dir():
        raise ConfigError(f"checkpoint folder {root} does not exist or is not a folder")
    folder = next((f for f in (root, root / "original") if (f / "config.json").is_file() and safetensors_files(f)),
                  None)
    if folder is None:
        if (root / "config.json").is_file():
            raise ConfigError(f"{root} has a config.json but no *.safetensors weights (nor an original/ folder "
                              "that has both)")
        raise ConfigError(f"{root} is neither checkpoint layout: expected config.json with *.safetensors files "
                          "(the original or the Hugging Face layout), or an original/ folder holding them")
    data = load_json(folder / "config.json")
    fmt: Literal["original", "hf"] = "hf" if "model_type" in data else "original"
    if fmt == "original" and "num_experts" not in data:
        raise ConfigError(f"{folder / 'config.json'} is neither an original gpt-oss config (num_experts, ...) "
                          "nor a Hugging Face one (model_type: gpt_oss)")
    return folder, fmt, ModelConfig.from_json_dict(data, str(folder / "config.json"))


def safetensors_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.safetensors") if p.is_file())
