"""runtime/cpu.py: the CPU that every benchmark results file records."""

from __future__ import annotations

from runtime.cpu import cpu_info, describe

ZEN5 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 26
model\t\t: 2
model name\t: AMD EPYC
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512dq avx512_vnni avx512_bf16
processor\t: 1
vendor_id\t: AuthenticAMD
cpu family\t: 26
model\t\t: 2
model name\t: AMD EPYC
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512dq avx512_vnni avx512_bf16
"""


def test_the_record_names_the_cpu_its_family_and_its_vector_extensions(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(ZEN5)
    info = cpu_info(str(path))
    assert info["model"] == "AMD EPYC" and info["vendor"] == "AuthenticAMD" and info["family"] == "26/2"
    assert info["extensions"] == ["avx2", "avx512f", "avx512_vnni", "avx512_bf16"]  # not AMX: absent
    assert describe(info).startswith("AMD EPYC (family 26/2), ")
    assert describe(info).endswith("cores, avx2 avx512f avx512_vnni avx512_bf16")


def test_two_virtual_cpus_of_the_same_name_are_told_apart_by_family(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(ZEN5.replace("cpu family\t: 26", "cpu family\t: 25").replace("model\t\t: 2", "model\t\t: 17"))
    assert cpu_info(str(path))["family"] == "25/17"


def test_without_cpuinfo_it_says_unknown(tmp_path):
    info = cpu_info(str(tmp_path / "absent"))
    assert info["vendor"] == "unknown" and info["family"] == "unknown" and info["extensions"] == []
    assert "(family" not in describe(info)
