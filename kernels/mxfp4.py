"""MXFP4 dequantization shared by the kernels and their twins (docs/spec.md, "MXFP4 experts")."""

from typing import NamedTuple

import jax
import jax.numpy as jnp

# FP4 (E2M1) code -> value; bit 3 is the sign.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


class Packed(NamedTuple):
    """MXFP4 matrices: the checkpoints' bytes in their order.

    blocks: uint8 [..., rows, cols/2], two FP4 codes a byte, the low nibble first (element 2j in byte j's low
            nibble). The files store [..., rows, cols/32, 16]; the same bytes with the last two axes merged, so
            that each row is one contiguous run (XLA:CPU vectorizes over it, TPU tiles its lanes over it).
    scales: uint8 [..., rows, cols/32], E8M0 exponents with bias 127; scale g covers elements 32g..32g+31.
    """

    blocks: jax.Array
    scales: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the decoded matrices."""
        return (*self.blocks.shape[:-1], self.blocks.shape[-1] * 2)


def dequantize(blocks: jax.Array, scales: jax.Array, dtype=jnp.bfloat16) -> jax.Array:
    """[..., rows, cols/2] uint8 codes and [..., rows, cols/32] scales -> [..., rows, cols] in `dtype` (exact)."""
    lut = jnp.asarray(FP4_VALUES, dtype=jnp.float32)
    codes = jnp.stack([blocks & 0x0F, blocks >> 4], axis=-1)  # low nibble = even element
    values = lut[codes.astype(jnp.int32)].reshape(*scales.shape, 32)
    scale = jax.lax.bitcast_convert_type(scales, jnp.float8_e8m0fnu).astype(jnp.float32)
    out = values * scale[..., None]
    return out.reshape(*scales.shape[:-1], -1).astype(dtype)
