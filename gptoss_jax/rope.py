"""Rotary position embedding with YaRN scaling, exactly as gpt-oss (docs/spec.md, "Rotary embedding with YaRN")."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from gptoss_jax.config import ModelConfig


def yarn_inv_freq(cfg: ModelConfig) -> tuple[np.ndarray, float]:
    """Inverse frequencies [head_dim/2] (float32) and the concentration that scales both cos and sin.

    The ramp between the interpolated (divided by the factor) and the original frequencies is NOT rounded.
    """
    d_half = cfg.head_dim // 2
    freq = cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim)
    if cfg.rope_scaling_factor <= 1.0:
        return (1.0 / freq).astype(np.float32), 1.0
    concentration = 0.1 * math.log(cfg.rope_scaling_factor) + 1.0
    log_base = math.log(cfg.rope_theta)
    low = d_half * math.log(cfg.initial_context_length / (cfg.rope_ntk_beta * 2 * math.pi)) / log_base
    high = d_half * math.log(cfg.initial_context_length / (cfg.rope_ntk_alpha * 2 * math.pi)) / log_base
    ramp = np.clip((np.arange(d_half, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    inv_freq = (1 - ramp) / freq + ramp / (cfg.rope_scaling_factor * freq)
    return inv_freq.astype(np.float32), concentration


def rope_cos_sin(positions: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """cos and sin [*positions.shape, head_dim/2] in float32, each already multiplied by the concentration."""
    inv_freq, concentration = yarn_inv_freq(cfg)
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    return jnp.cos(angles) * concentration, jnp.sin(angles) * concentration


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Half-split (NeoX) rotation of the last axis. x [B, T, ..., H]; cos, sin [B or 1, T, H/2]."""
    extra = x.ndim - cos.ndim
    cos = cos.reshape(*cos.shape[:2], *([1] * extra), cos.shape[-1])
    sin = sin.reshape(cos.shape)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
