"""harness/hidden_cpu_features: a child process sees a CPU without the hidden extensions, both in
the CPUID instruction (NumPy's own dispatch reads it) and in /proc/cpuinfo (runtime/cpu.py)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from harness.hidden_cpu_features import HiddenFeaturesError, environment, unavailable
from runtime.cpu import cpu_info

WHY = unavailable()
needs_hiding = pytest.mark.skipif(WHY is not None, reason=f"cannot hide CPU features here: {WHY}")
CHILD = """
import json
from numpy._core._multiarray_umath import __cpu_features__ as numpy_sees
from runtime.cpu import cpu_info, describe, int8_pairs_saturate
info = cpu_info()
print(json.dumps({"numpy": {k: numpy_sees[k] for k in ("AVX2", "AVX512F", "AVX512BW", "AVX512VNNI")},
                  "extensions": info["extensions"], "hidden": info.get("hidden"), "describe": describe(info),
                  "saturate": int8_pairs_saturate(info)}))
"""


def child(profile: str) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD], env=environment(profile), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@needs_hiding
@pytest.mark.skipif("avx512_vnni" not in cpu_info()["extensions"], reason="this CPU has no AVX-512 VNNI to hide")
def test_the_avx2_profile_hides_every_avx512_part_from_cpuid_and_cpuinfo():
    seen = child("avx2")
    assert seen["numpy"] == {"AVX2": True, "AVX512F": False, "AVX512BW": False, "AVX512VNNI": False}
    assert seen["extensions"] == ["avx2"] and seen["hidden"] == "avx2"
    assert seen["describe"].endswith("avx2 (the rest hidden: avx2 profile)")
    assert seen["saturate"] is True  # runtime/int8_cpu_graph.py takes the AVX2 path


@needs_hiding
@pytest.mark.skipif("avx512_vnni" not in cpu_info()["extensions"], reason="this CPU has no AVX-512 VNNI to hide")
def test_the_avx512_profile_hides_only_vnni():
    seen = child("avx512")
    assert seen["numpy"] == {"AVX2": True, "AVX512F": True, "AVX512BW": True, "AVX512VNNI": False}
    assert "avx512f" in seen["extensions"] and not {"avx512_vnni", "avx_vnni", "amx_int8"} & set(seen["extensions"])
    assert seen["saturate"] is True


def test_an_unknown_profile_or_no_command_is_refused_in_one_line():
    with pytest.raises(HiddenFeaturesError, match="unknown profile 'sse2'"):
        environment("sse2")
    done = subprocess.run([sys.executable, "-m", "harness.hidden_cpu_features", "avx2"], capture_output=True, text=True)
    assert done.returncode == 2 and "give the command to run" in done.stderr


@pytest.mark.skipif(sys.platform != "linux" or platform.machine() != "x86_64", reason="the check after the platform's")
def test_it_says_why_where_it_cannot_hide(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t\t: fpu sse2 avx avx2 avx512f\n")
    assert "no cpuid_fault" in unavailable(str(cpuinfo))
    assert "cannot read" in unavailable(str(tmp_path / "absent"))


def test_a_command_that_cannot_run_is_one_line_not_a_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "harness.hidden_cpu_features", "avx2", str(tmp_path / "absent")],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"error: {tmp_path / 'absent'}: No such file or directory"]
