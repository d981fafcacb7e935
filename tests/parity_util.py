"""Shared parity measures: the tolerance is relative to the logit scale, as the parity tier specifies."""

import numpy as np

TOLERANCE = 1e-4  # max abs error / max(1, max |reference logit|)
ARGMAX_AGREEMENT = 0.95


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(ours - reference).max() / max(1.0, np.abs(reference).max()))


def argmax_agreement(ours: np.ndarray, reference: np.ndarray) -> float:
    return float((ours.argmax(-1) == reference.argmax(-1)).mean())
