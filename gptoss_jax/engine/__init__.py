"""The inference core shared by `gj.generate` and the server: one sampler, one set of jitted steps, one engine."""

from gptoss_jax.engine.core import Engine, EngineStopped, QueueFull
from gptoss_jax.engine.request import Constraint, GenRequest, check_request
from gptoss_jax.engine.sampling import Sampling, sample
from gptoss_jax.engine.steps import PREFILL_CHUNK, Steps, bucket, steps

__all__ = ["PREFILL_CHUNK", "Constraint", "Engine", "EngineStopped", "GenRequest", "QueueFull", "Sampling", "Steps",
           "bucket", "check_request", "sample", "steps"]
