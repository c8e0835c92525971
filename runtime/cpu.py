"""This machine's CPU: model name and the vector extensions that decide which kernels run fastest,
and the one switch of its floating-point mode the project sets (denormals as zero).

Every benchmark records it with its figures (figures from two CPUs are never mixed).
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform

EXTENSIONS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
# Set where harness/hidden_cpu_features.c hides extensions from this process (it filters the flags
# read below, so that they are the ones ONNX Runtime sees): "avx2" or "avx512".
HIDDEN_ENV = "HIDDEN_CPU_FEATURES"
# Any of these gives ONNX Runtime's x86 int8 kernels a 32-bit sum of uint8 x int8 products.
VNNI = ("avx512_vnni", "avx_vnni", "amx_int8")


def cpu_info(cpuinfo_path: str = "/proc/cpuinfo") -> dict:
    """{"model": ..., "vendor": ..., "family": "26/2", "cores": N, "extensions": [...]} ("unknown" where
    not Linux), and "hidden": the profile where extensions are hidden from this process
    (harness/hidden_cpu_features.py). A virtual machine may name its CPU only "AMD EPYC": the
    family and model numbers tell a Zen 4 (family 25) from a Zen 5 (26)."""
    from model.runtime import available_cores, read_cpuinfo

    fields = read_cpuinfo(cpuinfo_path)
    flags = set(fields.get("flags", "").split())
    hidden = {"hidden": os.environ[HIDDEN_ENV]} if os.environ.get(HIDDEN_ENV) else {}
    return {
        "model": fields.get("model name", platform.processor() or "unknown"),
        "vendor": fields.get("vendor_id", "unknown"),
        "family": f"{fields['cpu family']}/{fields.get('model', '?')}" if "cpu family" in fields else "unknown",
        "cores": available_cores(),
        "extensions": [name for name in EXTENSIONS if name in flags],
        **hidden,
    }


def describe(info: dict | None = None) -> str:
    """One line: "AMD EPYC (family 26/2), 2 cores, avx2 avx512f avx512_vnni"; where extensions are
    hidden, it says so: "..., avx2 (the rest hidden: avx2 profile)"."""
    info = info or cpu_info()
    family = f" (family {info['family']})" if info.get("family", "unknown") != "unknown" else ""
    hidden = f" (the rest hidden: {info['hidden']} profile)" if info.get("hidden") else ""
    return f"{info['model']}{family}, {info['cores']} cores, {' '.join(info['extensions']) or 'no AVX2'}{hidden}"


def int8_pairs_saturate(info: dict | None = None, machine: str | None = None) -> bool:
    """Whether ONNX Runtime's uint8 x int8 kernels on this CPU add each pair of neighbouring products
    in 16 bits with saturation: x86-64 without VNNI (AVX2, or AVX-512 without VNNI), where MLAS
    runs VPMADDUBSW, which clamps a pair's sum to +-32767 (ONNX Runtime's quantization guide,
    "saturation"; its MlasGemmU8S8KernelAvx2 and MlasConvSymKernelAvx2). VNNI sums in 32 bits.
    runtime/int8_cpu_graph.py keeps the layers that would saturate off those kernels."""
    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64"):
        return False
    info = info or cpu_info()
    return not any(name in info["extensions"] for name in VNNI)


# MXCSR bits: flush results that would be subnormal to zero (FTZ, bit 15) and read subnormal
# inputs as zero (DAZ, bit 6).
FLUSH_TO_ZERO, DENORMALS_ARE_ZERO = 1 << 15, 1 << 6
# glibc's fenv_t on x86-64: the x87 environment (28 bytes), then the MXCSR register.
_FENV_SIZE, _MXCSR_OFFSET = 32, 28


@functools.cache
def _libm():
    """glibc's libm where FTZ/DAZ can be set (x86-64 Linux), else None."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
    except OSError:
        return None


@contextlib.contextmanager
def denormals_as_zero(enabled: bool = True):
    """Within the block, the calling thread flushes subnormal results to zero and reads subnormal
    inputs as zero (FTZ and DAZ in its MXCSR, through glibc's fegetenv/fesetenv); with `enabled`
    False it computes subnormals instead. Its previous mode comes back after. Where that cannot be
    set (not x86-64 Linux), the block runs unchanged.

    ONNX Runtime's `session.set_denormal_as_zero` sets the mode in its thread pool, and (ONNX
    Runtime 1.32) in the thread that creates the process's first session if that session asks for
    it; not in any other thread that calls `run`, which computes its share of every parallel node:
    with the option set, 0.6% of the first ACmix layer's attention weights still came out
    subnormal (AMD EPYC, 64 validation images; none with this block around `run`). Subnormal
    operands cost ~10x per product on some Intel CPUs (../shared/notes/subnormals.md).
    """
    import ctypes
    import struct

    libm = _libm()
    saved = ctypes.create_string_buffer(_FENV_SIZE)
    if libm is None or libm.fegetenv(saved) != 0:
        yield
        return
    flushing = ctypes.create_string_buffer(saved.raw, _FENV_SIZE)
    mxcsr = struct.unpack_from("<I", saved.raw, _MXCSR_OFFSET)[0]
    bits = FLUSH_TO_ZERO | DENORMALS_ARE_ZERO
    struct.pack_into("<I", flushing, _MXCSR_OFFSET, mxcsr | bits if enabled else mxcsr & ~bits)
    libm.fesetenv(flushing)
    try:
        yield
    finally:
        libm.fesetenv(saved)
