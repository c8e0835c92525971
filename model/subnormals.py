"""Subnormal floats in weights: counted and flushed to exactly zero (../shared/notes/subnormals.md).

Weight decay shrinks the weights of units that never activate until they are subnormal
(|w| < 1.18e-38 in float32, not zero). They change no logit measurably, and on some CPUs every
product with one is ~100x slower (an Intel Xeon ran ONNX Runtime at half speed). Training flushes
them whenever it saves, and the ONNX export flushes its initializers. NumPy only.
"""

from __future__ import annotations

import numpy as np


def subnormal_mask(array: np.ndarray) -> np.ndarray:
    """True where a floating-point value is subnormal (non-zero and below the smallest normal)."""
    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.floating):
        return np.zeros(array.shape, dtype=bool)
    magnitude = np.abs(array)
    return (magnitude > 0) & (magnitude < np.finfo(array.dtype).tiny)


def count_subnormals(array: np.ndarray) -> int:
    return int(subnormal_mask(array).sum())


def flush_subnormals(array: np.ndarray) -> np.ndarray:
    """The array with its subnormal values set to 0 (the array itself when it has none)."""
    mask = subnormal_mask(array)
    if not mask.any():
        return array
    flushed = np.array(array, copy=True)
    flushed[mask] = 0
    return flushed
