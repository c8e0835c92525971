"""Process-wide Paddle settings shared by training, evaluation and export."""

from __future__ import annotations

import logging
import os
import warnings


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def is_amd_cpu(cpuinfo_path: str = "/proc/cpuinfo") -> bool:
    try:
        with open(cpuinfo_path) as cpuinfo:
            return any(line.startswith("vendor_id") and "AuthenticAMD" in line for line in cpuinfo)
    except OSError:  # not Linux
        return False


def use_fast_mkl_kernels_on_amd() -> None:
    """Paddle's CPU wheel bundles MKL 2019, which runs its generic kernels on AMD CPUs unless
    MKL_DEBUG_CPU_TYPE=5 selects the AVX2 ones: on this project's AMD EPYC machine that makes a
    matmul 3.3x and a training step 2x faster (../shared/notes and README, "Training speed").
    Set only on AMD (on Intel it would turn AVX-512 off) and only where the user has not set it.
    """
    if is_amd_cpu():
        os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")


def import_paddle(threads: int | None = None):
    """Import paddle quietly, on the CPU, using `threads` (default: every core available).

    Paddle's CPU kernels use one thread unless told otherwise.
    """
    use_fast_mkl_kernels_on_amd()  # before MKL first runs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import paddle
    logging.getLogger("paddle").setLevel(logging.ERROR)
    paddle.set_device("cpu")
    paddle.base.core.set_num_threads(threads or available_cores())
    return paddle
