"""This machine's CPU: model name and the vector extensions that decide which kernels run fastest.

Every benchmark records it with its figures (figures from two CPUs are never mixed).
"""

from __future__ import annotations

import platform

EXTENSIONS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


def cpu_info(cpuinfo_path: str = "/proc/cpuinfo") -> dict:
    """{"model": ..., "vendor": ..., "family": "26/2", "cores": N, "extensions": [...]} ("unknown" where
    not Linux). A virtual machine may name its CPU only "AMD EPYC": the family and model numbers
    tell a Zen 4 (family 25) from a Zen 5 (26)."""
    import os

    from model.runtime import read_cpuinfo

    fields = read_cpuinfo(cpuinfo_path)
    flags = set(fields.get("flags", "").split())
    return {
        "model": fields.get("model name", platform.processor() or "unknown"),
        "vendor": fields.get("vendor_id", "unknown"),
        "family": f"{fields['cpu family']}/{fields.get('model', '?')}" if "cpu family" in fields else "unknown",
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "extensions": [name for name in EXTENSIONS if name in flags],
    }


def describe(info: dict | None = None) -> str:
    """One line: "AMD EPYC (family 26/2), 2 cores, avx2 avx512f avx512_vnni"."""
    info = info or cpu_info()
    family = f" (family {info['family']})" if info.get("family", "unknown") != "unknown" else ""
    return f"{info['model']}{family}, {info['cores']} cores, {' '.join(info['extensions']) or 'no AVX2'}"
