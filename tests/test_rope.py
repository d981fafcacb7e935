import math

import jax.numpy as jnp
import numpy as np

import gptoss_jax as gj
from gptoss_jax.rope import apply_rope, rope_cos_sin, yarn_inv_freq

CFG = gj.ModelConfig.gpt_oss_20b()


def test_yarn_inverse_frequencies_match_the_closed_form():
    inv_freq, concentration = yarn_inv_freq(CFG)
    assert math.isclose(concentration, 0.1 * math.log(32) + 1, rel_tol=1e-12)
    assert abs(concentration - 1.34657) < 1e-5
    low = 32 * math.log(4096 / (32 * 2 * math.pi)) / math.log(150000)
    high = 32 * math.log(4096 / (2 * math.pi)) / math.log(150000)
    assert abs(low - 8.0928) < 1e-4 and abs(high - 17.3980) < 1e-4
    base = 1 / 150000 ** (2 * np.arange(32) / 64)
    np.testing.assert_allclose(inv_freq[:9], base[:9], rtol=1e-6)  # j <= 8 keep the base frequency
    np.testing.assert_allclose(inv_freq[18:], base[18:] / 32, rtol=1e-6)  # j >= 18 are divided by 32
    j = np.arange(9, 18)
    ramp = (j - low) / (high - low)  # NOT rounded (truncate: false)
    np.testing.assert_allclose(inv_freq[9:18], (1 - ramp) * base[j] + ramp * base[j] / 32, rtol=1e-6)


def test_concentration_scales_both_cos_and_sin():
    cos, sin = rope_cos_sin(jnp.arange(0, 5000, 7)[None], CFG)
    np.testing.assert_allclose(np.asarray(cos**2 + sin**2), 1.34657**2, rtol=2e-5)


def test_rotation_is_half_split_not_interleaved():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 3, 2, 64)).astype(np.float32)
    pos = np.array([[0, 5, 300]])
    cos, sin = rope_cos_sin(jnp.asarray(pos), CFG)
    out = np.asarray(apply_rope(jnp.asarray(x), cos, sin))
    inv_freq, c = yarn_inv_freq(CFG)
    for t in range(3):
        for j in range(32):  # dims j and j + 32 rotate together
            a = pos[0, t] * inv_freq[j]
            x1, x2 = x[0, t, :, j], x[0, t, :, j + 32]
            np.testing.assert_allclose(out[0, t, :, j], c * (x1 * np.cos(a) - x2 * np.sin(a)), atol=2e-5)
            np.testing.assert_allclose(out[0, t, :, j + 32], c * (x2 * np.cos(a) + x1 * np.sin(a)), atol=2e-5)


def test_scores_depend_only_on_relative_position():
    rng = np.random.default_rng(1)
    q, k = rng.normal(size=(2, 64)).astype(np.float32)
    def score(i, j):
        cos, sin = rope_cos_sin(jnp.asarray([[i, j]]), CFG)
        x = apply_rope(jnp.asarray(np.stack([q, k])[None, :, None]), cos, sin)[0, :, 0]
        return float(x[0] @ x[1])
    assert abs(score(10, 3) - score(110, 103)) < 1e-3 * abs(score(10, 3)) + 1e-4
    np.testing.assert_allclose(score(0, 0), 1.34657**2 * float(q @ k), rtol=1e-4)
