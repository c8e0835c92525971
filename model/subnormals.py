"""Subnormal floats in weights: counted and flushed to exactly zero (../shared/notes/subnormals.md).

Weight decay shrinks the weights of units that never activate until they are subnormal
(|w| < 1.18e-38 in float32, not zero). They change no logit measurably, and on some CPUs every
product with one is ~100x slower (an Intel Xeon ran ONNX Runtime at half speed). Training flushes
them whenever it saves, and the ONNX export flushes its initializers. NumPy only.
"""

from __future__ import annotations

import numpy as np

_BITS = {2: np.uint16, 4: np.uint32, 8: np.uint64}  # IEEE half, single and double by size


def subnormal_mask(array: np.ndarray) -> np.ndarray:
    """True where a floating-point value is subnormal (non-zero and below the smallest normal).

    Read from the bits (exponent field 0, mantissa not), not by comparing magnitudes: a thread that
    runs ONNX Runtime reads subnormal inputs as zero (runtime/cpu.py), and there `|x| > 0` is False
    for every subnormal x."""
    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.floating) or array.dtype.itemsize not in _BITS:
        return np.zeros(array.shape, dtype=bool)
    info = np.finfo(array.dtype)
    bits = np.ascontiguousarray(array).view(_BITS[array.dtype.itemsize])
    mantissa = (1 << info.nmant) - 1
    exponent = ((1 << info.nexp) - 1) << info.nmant
    return ((bits & exponent) == 0) & ((bits & mantissa) != 0)


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
