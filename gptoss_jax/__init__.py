"""gptoss-jax: OpenAI's gpt-oss-20b and gpt-oss-120b in JAX + Flax NNX."""

from gptoss_jax.checkpoint import CheckpointError, find_layout, load_model, save_checkpoint
from gptoss_jax.config import ConfigError, ModelConfig
from gptoss_jax import harmony, mxfp4
from gptoss_jax.engine import Sampling
from gptoss_jax.generate import generate
from gptoss_jax.kvcache import KVCache
from gptoss_jax.model import Transformer, init_model, param_bytes, param_count
from gptoss_jax.sharding import make_mesh

__all__ = [
    "CheckpointError", "ConfigError", "KVCache", "ModelConfig", "Sampling", "Transformer", "find_layout", "generate",
    "harmony", "init_model", "load_model", "make_mesh", "mxfp4", "param_bytes", "param_count", "save_checkpoint",
]
