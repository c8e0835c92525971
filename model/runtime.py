"""Process-wide Paddle settings shared by training, evaluation and export: threads, MKL, device."""

from __future__ import annotations

import logging
import os
import warnings

DEVICES = ("auto", "cpu", "gpu")


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
    matmul 3.3x and a training step 2x faster (README, "Training speed").
    Set only on AMD (on Intel it would turn AVX-512 off) and only where the user has not set it.
    """
    if is_amd_cpu():
        os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")


def _paddle():
    use_fast_mkl_kernels_on_amd()  # before MKL first runs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import paddle
    logging.getLogger("paddle").setLevel(logging.ERROR)
    return paddle


def resolve_device(requested: str = "auto") -> tuple[str, str]:
    """("cpu" or "gpu", why): auto takes a CUDA GPU where the installed Paddle is a CUDA build
    (paddlepaddle-gpu) and one is visible; ValueError where "gpu" is asked for and there is none."""
    if requested not in DEVICES:
        raise ValueError(f"unknown device {requested!r}; choose from {', '.join(DEVICES)}")
    if requested == "cpu":
        return "cpu", "asked for"
    paddle = _paddle()
    if not paddle.device.is_compiled_with_cuda():
        missing = "the installed Paddle is a CPU build (paddlepaddle, not paddlepaddle-gpu)"
    elif paddle.device.cuda.device_count() == 0:
        missing = "no CUDA GPU is visible"
    else:
        return "gpu", f"{paddle.device.cuda.get_device_name(0)}, {'asked for' if requested == 'gpu' else 'auto'}"
    if requested == "gpu":
        raise ValueError(f"--device gpu: {missing}")
    return "cpu", f"auto: {missing}"


def import_paddle(threads: int | None = None, device: str = "cpu"):
    """Import paddle quietly on `device` ("cpu" or "gpu"); on the CPU using `threads` (default:
    every core available), since Paddle's CPU kernels use one thread unless told otherwise."""
    paddle = _paddle()
    paddle.set_device("gpu:0" if device == "gpu" else "cpu")
    paddle.base.core.set_num_threads(threads or available_cores())
    return paddle
