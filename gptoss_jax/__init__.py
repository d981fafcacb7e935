"""gptoss-jax: OpenAI's gpt-oss-20b and gpt-oss-120b in JAX + Flax NNX."""

from gptoss_jax.config import ConfigError, ModelConfig
from gptoss_jax.model import Transformer, init_model, param_bytes, param_count

__all__ = ["ConfigError", "ModelConfig", "Transformer", "init_model", "param_bytes", "param_count"]
