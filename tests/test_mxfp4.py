import jax.numpy as jnp
import numpy as np
import pytest

from gptoss_jax import mxfp4

TABLE = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def test_decode_every_byte_low_nibble_first():
    blocks = np.arange(256, dtype=np.uint8).reshape(16, 16)  # 16 rows, one 32-element block each
    scales = np.full((16, 1), 127, np.uint8)  # 2^0
    out = np.asarray(mxfp4.decode(jnp.asarray(blocks), jnp.asarray(scales), jnp.float32)).reshape(-1)
    expected = [v for b in range(256) for v in (TABLE[b & 0xF], TABLE[b >> 4])]
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(np.signbit(out), np.signbit(expected))  # codes 8 decode to -0.0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_decode_scales_are_exact_powers_of_two(dtype):
    s = np.arange(100, 141, dtype=np.uint8)
    blocks = np.full((len(s), 16), 0x76, np.uint8)  # elements 4.0 (low nibble 6), 6.0 (high nibble 7)
    out = np.asarray(mxfp4.decode(jnp.asarray(blocks), jnp.asarray(s[:, None]), dtype), np.float64)
    np.testing.assert_array_equal(out[:, 1], 6.0 * 2.0 ** (s.astype(np.float64) - 127))
    np.testing.assert_array_equal(out[:, 0], 4.0 * 2.0 ** (s.astype(np.float64) - 127))
    np.testing.assert_array_equal(out, mxfp4.decode_np(blocks, s[:, None]))


def _random_packed(rng, shape=(3, 8, 64)):
    *lead, cols = shape
    blocks = rng.integers(0, 256, (*lead, cols // 2), dtype=np.uint8)
    scales = rng.integers(115, 135, (*lead, cols // 32), dtype=np.uint8)
    return blocks, scales


def test_encode_is_exact_on_representable_values():
    blocks, scales = _random_packed(np.random.default_rng(0))
    w = mxfp4.decode_np(blocks, scales)
    packed = mxfp4.encode(w)
    np.testing.assert_array_equal(mxfp4.decode_np(packed.blocks, packed.scales), w)
    # Where a block holds a 4 or 6, the smallest non-clipping scale is the original one: identical bytes.
    codes = np.stack([blocks & 7, (blocks >> 4) & 7], -1).reshape(*scales.shape, 32)
    full = (codes >= 6).any(-1)
    np.testing.assert_array_equal(packed.scales[full], scales[full])
    by_block = lambda b: b.reshape(*scales.shape, 16)  # noqa: E731
    np.testing.assert_array_equal(by_block(packed.blocks)[full], by_block(blocks)[full])


def test_encode_rounds_to_nearest_with_ties_to_even_codes():
    # With a 6.0 in the block the scale is 2^0; midpoints between grid values go to the even code.
    mids = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.75, 0.3, 2.9]
    want = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -1.0, 0.5, 3.0]
    w = np.zeros((1, 32), np.float32)
    w[0, : len(mids)] = mids
    w[0, -1] = 6.0
    p = mxfp4.encode(w)
    assert p.scales[0, 0] == 127
    np.testing.assert_array_equal(mxfp4.decode_np(p.blocks, p.scales)[0, : len(want)], want)


def test_encode_error_is_within_half_a_grid_step_and_never_clips():
    w = np.random.default_rng(1).normal(0, 0.02, (16, 256)).astype(np.float32)
    w[0, :32] *= 1000  # a block with a large range
    p = mxfp4.encode(w)
    back = mxfp4.decode_np(p.blocks, p.scales)
    step = np.ldexp(1.0, p.scales.astype(np.int32) - 127)  # the largest grid gap (4 -> 6) is 2 * scale
    err = np.abs(back - w).reshape(16, -1, 32).max(-1)
    assert (err <= step + 1e-12).all()
    assert np.abs(back).reshape(16, -1, 32).max(-1).min() > 0


def test_encode_rejects_bad_shapes_and_values():
    with pytest.raises(ValueError, match="multiple of 32"):
        mxfp4.encode(np.ones((2, 30)))
    with pytest.raises(ValueError, match="non-finite"):
        mxfp4.encode(np.full((1, 32), np.nan))
