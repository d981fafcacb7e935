"""MXFP4 codec (docs/spec.md, "MXFP4 experts"): 32-element blocks of FP4 (E2M1) codes sharing one E8M0 scale.

`decode` is exact (jnp, jit-able); `encode` rounds to nearest (ties to even codes) with the smallest scale that
does not clip the block, so `decode(encode(w)) == w` wherever w is exactly representable.
"""

import numpy as np

from gptoss_kernels.mxfp4 import FP4_VALUES, Packed, dequantize as decode

__all__ = ["FP4_VALUES", "Packed", "decode", "encode", "decode_np"]

_MAGNITUDES = np.asarray(FP4_VALUES[:8], np.float32)  # codes 0..7


def decode_np(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Host-side float32 decode (for writers and tests; same table as `decode`)."""
    lut = np.asarray(FP4_VALUES, np.float32)
    values = np.stack([lut[blocks & 0x0F], lut[blocks >> 4]], axis=-1).reshape(*scales.shape, 32)
    values = np.ldexp(values, scales.astype(np.int32)[..., None] - 127)
    return values.reshape(*scales.shape[:-1], -1)


def encode(w: np.ndarray) -> Packed:
    """[..., rows, cols] float -> Packed(blocks [..., rows, cols/2], scales [..., rows, cols/32]) as numpy."""
    w = np.asarray(w, np.float32)
    if w.shape[-1] % 32:
        raise ValueError(f"MXFP4 encode needs the last dimension to be a multiple of 32, got shape {w.shape}")
    if not np.isfinite(w).all():
        raise ValueError("MXFP4 encode got non-finite values")
    g = w.reshape(*w.shape[:-1], w.shape[-1] // 32, 32)
    amax = np.abs(g).max(axis=-1)
    # The smallest power of two 2^e with amax / 2^e <= 6 (FP4's largest magnitude), so nothing clips.
    with np.errstate(divide="ignore"):
        e = np.ceil(np.log2(amax / 6.0))
    e = np.where(amax > 0, e, 0)
    # log2 rounding can leave amax / 2^e just above 6; step up where it does.
    e = np.where(np.ldexp(np.float32(6.0), e.astype(np.int32)) < amax, e + 1, e)
    e = np.clip(e, -127, 127).astype(np.int32)
    x = np.abs(np.ldexp(g, -e[..., None]))
    # Nearest magnitude, ties to the even code.
    hi = np.clip(np.searchsorted(_MAGNITUDES, x), 1, 7)
    lo = hi - 1
    d_lo, d_hi = x - _MAGNITUDES[lo], _MAGNITUDES[hi] - x
    code = np.where((d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0)), hi, lo).astype(np.uint8)
    code |= np.where(np.signbit(g), 8, 0).astype(np.uint8)
    code = code.reshape(*w.shape[:-1], -1, 2)
    blocks = code[..., 0] | (code[..., 1] << 4)
    return Packed(blocks.astype(np.uint8), (e + 127).astype(np.uint8))
