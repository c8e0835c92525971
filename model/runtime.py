"""Process-wide Paddle settings shared by training, evaluation and export: threads, MKL, device."""

from __future__ import annotations

import logging
import math
import os
import signal
import warnings
from pathlib import Path

DEVICES = ("auto", "cpu", "gpu")


def available_cores(cgroup: str = "/sys/fs/cgroup") -> int:
    """The cores this process may use: those it may run on (affinity), at most its CPU quota
    (a container's `--cpus`: cgroup v2 cpu.max, or v1 cpu.cfs_quota_us / cpu.cfs_period_us),
    rounded up. Threads and worker counts follow it."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = cpu_quota(cgroup)
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def cpu_quota(cgroup: str = "/sys/fs/cgroup") -> float | None:
    """The CPU quota of this process's cgroup in cores, or None where there is none or it cannot be read."""
    root = Path(cgroup)
    try:
        fields = (root / "cpu.max").read_text().split()  # v2: "max 100000" or "400000 100000"
        quota, period = fields[0], fields[1]
    except (OSError, IndexError):
        try:  # v1
            quota = (root / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (root / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    try:
        quota_us, period_us = float(quota), float(period)
    except ValueError:  # "max": no quota
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


# MKL 2019's internal code paths, for MKL_DEBUG_CPU_TYPE (which only AMD CPUs need): 5 is AVX2, 7 is
# the AVX-512 of Xeon processors (F, CD, BW, DQ, VL), which AMD's Zen 4 and Zen 5 have too.
MKL_AVX2, MKL_AVX512 = "5", "7"
AVX512_FOR_MKL = ("avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl")


def read_cpuinfo(cpuinfo_path: str = "/proc/cpuinfo") -> dict[str, str]:
    """The first CPU's "model name", "vendor_id", "cpu family", "model" and "flags" lines of
    /proc/cpuinfo ({} where it cannot be read: not Linux). runtime/cpu.py, which benchmarks record,
    reads it through here too."""
    fields: dict[str, str] = {}
    try:
        with open(cpuinfo_path) as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "vendor_id", "cpu family", "model", "flags") and key not in fields:
                    fields[key] = value.strip()
    except OSError:
        pass
    return fields


def cpu_vendor_and_flags(cpuinfo_path: str = "/proc/cpuinfo") -> tuple[str, set[str]]:
    """The first CPU's vendor_id and flags ("" and none where /proc/cpuinfo cannot be read)."""
    fields = read_cpuinfo(cpuinfo_path)
    return fields.get("vendor_id", ""), set(fields.get("flags", "").split())


def mkl_code_path(cpuinfo_path: str = "/proc/cpuinfo") -> str | None:
    """The MKL_DEBUG_CPU_TYPE this CPU wants, or None where MKL chooses well by itself (Intel).

    Paddle's CPU wheel bundles MKL 2019, which runs its generic kernels on AMD CPUs unless told
    which code path to take: AVX2 on every AMD CPU this project has had (a training step 2x faster
    than the generic kernels), AVX-512 where the CPU has the Xeon set (AMD EPYC Zen 5: the stem's
    convolutions 0.33 -> 0.26 s per training step, forward and backward; docs/model.md, "Training speed").
    """
    vendor, flags = cpu_vendor_and_flags(cpuinfo_path)
    if vendor != "AuthenticAMD":
        return None
    return MKL_AVX512 if all(flag in flags for flag in AVX512_FOR_MKL) else MKL_AVX2


def use_fast_mkl_kernels_on_amd() -> None:
    """Set MKL_DEBUG_CPU_TYPE for this CPU (mkl_code_path), only where the user has not set it;
    nothing on Intel, where it would narrow MKL's own choice."""
    path = mkl_code_path()
    if path is not None:
        os.environ.setdefault("MKL_DEBUG_CPU_TYPE", path)


def _paddle():
    use_fast_mkl_kernels_on_amd()  # before MKL first runs
    python_handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM,)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import paddle
    logging.getLogger("paddle").setLevel(logging.ERROR)
    # Paddle's C++ handlers print a stack dump on SIGTERM and on crashes, and can deadlock doing so
    # (seen: `timeout` on model.evaluate hung in the handler's malloc for 10 minutes): a stop should
    # stop. Disabling them leaves the default action, so a Python handler set before is set again.
    paddle.disable_signal_handler()
    for sig, handler in python_handlers.items():
        if callable(handler):
            signal.signal(sig, handler)
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
