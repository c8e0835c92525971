"""Process-wide Paddle settings: which MKL kernels run on which CPU."""

from __future__ import annotations

import pytest

from model import runtime


@pytest.mark.parametrize("amd,preset,expected", [
    (True, None, "5"),      # AMD: MKL's AVX2 kernels instead of its generic ones
    (False, None, None),    # Intel and others: MKL's own choice (AVX-512 where there is one)
    (True, "0", "0"),       # a value the user set is kept
])
def test_mkl_kernel_choice(monkeypatch, amd, preset, expected):
    monkeypatch.setattr(runtime, "is_amd_cpu", lambda: amd)
    if preset is None:
        monkeypatch.delenv("MKL_DEBUG_CPU_TYPE", raising=False)
    else:
        monkeypatch.setenv("MKL_DEBUG_CPU_TYPE", preset)
    runtime.use_fast_mkl_kernels_on_amd()
    assert runtime.os.environ.get("MKL_DEBUG_CPU_TYPE") == expected


def test_cpu_vendor_is_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\n")
    assert runtime.is_amd_cpu(str(cpuinfo))
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel Xeon\n")
    assert not runtime.is_amd_cpu(str(cpuinfo))
    assert not runtime.is_amd_cpu(str(tmp_path / "absent"))
