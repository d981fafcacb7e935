"""MXFP4 dequantization shared by the kernels and their twins (SPEC.md, "MXFP4")."""

from typing import NamedTuple

import jax
import jax.numpy as jnp

# FP4 (E2M1) code -> value; bit 3 is the sign.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


class Packed(NamedTuple):
    """MXFP4 matrices exactly in the checkpoints' block layout.

    blocks: uint8 [..., rows, cols/32, 16], two FP4 codes a byte, the low nibble first.
    scales: uint8 [..., rows, cols/32], E8M0 exponents with bias 127.
    """

    blocks: jax.Array
    scales: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the decoded matrices."""
        *lead, groups, nbytes = self.blocks.shape
        return (*lead, groups * nbytes * 2)


def dequantize(blocks: jax.Array, scales: jax.Array, dtype=jnp.bfloat16) -> jax.Array:
    """[..., rows, G, 16] uint8 codes and [..., rows, G] scales -> [..., rows, G*32] values in `dtype` (exact)."""
    lut = jnp.asarray(FP4_VALUES, dtype=jnp.float32)
    codes = jnp.stack([blocks & 0x0F, blocks >> 4], axis=-1)  # low nibble = even element
    values = lut[codes.astype(jnp.int32)].reshape(*blocks.shape[:-1], blocks.shape[-1] * 2)
    scale = jax.lax.bitcast_convert_type(scales, jnp.float8_e8m0fnu).astype(jnp.float32)
    out = values * scale[..., None]
    return out.reshape(*blocks.shape[:-2], -1).astype(dtype)
