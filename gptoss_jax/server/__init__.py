"""An OpenAI-compatible server with continuous batching (`gptoss-jax serve`) and offline batch inference
(`gptoss-jax batch`). See docs/server.md."""

from gptoss_jax.server.engine import Constraint, Engine, ForcedTokens, GenRequest, QueueFull

__all__ = ["Constraint", "Engine", "ForcedTokens", "GenRequest", "QueueFull"]
