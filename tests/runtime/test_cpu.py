"""runtime/cpu.py: the CPU that every benchmark results file records, and denormals as zero."""

from __future__ import annotations

import platform

import numpy as np
import pytest

from runtime.cpu import cpu_info, denormals_as_zero, describe, int8_pairs_saturate

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


@pytest.mark.parametrize(("flags", "machine", "saturate"), [
    ("avx avx2 fma", "x86_64", True),  # AVX2 only: VPMADDUBSW
    ("avx2 avx512f avx512bw", "x86_64", True),  # AVX-512 without VNNI
    ("avx2 avx512f avx512_vnni", "x86_64", False),
    ("avx2 avx_vnni", "x86_64", False),  # Alder Lake and later clients
    ("avx2 avx512f amx_tile amx_int8", "x86_64", False),
    ("fp asimd asimddp", "aarch64", False),  # not x86: other kernels
])
def test_int8_pairs_saturate_on_x86_without_vnni(tmp_path, flags, machine, saturate):
    """The rule over /proc/cpuinfo flags (written here; the kernels themselves cannot run here)."""
    path = tmp_path / "cpuinfo"
    path.write_text(ZEN5.replace("fpu sse2 avx avx2 fma avx512f avx512dq avx512_vnni avx512_bf16", flags))
    assert int8_pairs_saturate(cpu_info(str(path)), machine=machine) is saturate


needs_x86_linux = pytest.mark.skipif(
    platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"),
    reason="FTZ/DAZ are set through glibc's x86-64 floating-point environment")
SMALLEST_NORMAL = np.finfo(np.float32).tiny


def halve(x: np.ndarray) -> np.ndarray:
    return x * np.float32(0.5)


@needs_x86_linux
def test_within_the_block_subnormal_results_are_zero_and_the_mode_comes_back():
    """Either mode, nested either way: the block's mode inside, the enclosing one after. The outer
    block sets a known mode: ONNX Runtime may have set DAZ in this thread already (runtime/cpu.py)."""
    x = np.array([SMALLEST_NORMAL], np.float32)
    with denormals_as_zero(False):
        assert halve(x)[0] > 0  # a subnormal result
        with denormals_as_zero():
            assert halve(x)[0] == 0
            with denormals_as_zero(False):
                assert halve(x)[0] > 0
            assert halve(x)[0] == 0
        assert halve(x)[0] > 0


@needs_x86_linux
def test_a_session_of_the_factory_runs_with_denormals_as_zero_in_the_calling_thread(tmp_path):
    """ONNX Runtime's own option leaves a thread that calls run computing subnormals (one thread:
    the whole graph runs there); a session from create_session does not, and leaves the thread's
    mode as it was. The thread computes subnormals within the outer block whatever ran before in
    this process (ONNX Runtime sets DAZ in the thread that creates its first session, if that
    session asks for it)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from runtime.onnxruntime import create_session, session_options

    half = numpy_helper.from_array(np.array([0.5], np.float32), "half")
    graph = helper.make_graph([helper.make_node("Mul", ["x", "half"], ["y"])], "halve",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], [half])
    path = tmp_path / "halve.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    x = {"x": np.array([SMALLEST_NORMAL], np.float32)}
    plain = ort.InferenceSession(str(path), session_options(threads=1), providers=["CPUExecutionProvider"])
    factory = create_session(path, threads=1, providers=["CPUExecutionProvider"])
    assert plain.get_session_options().get_session_config_entry("session.set_denormal_as_zero") == "1"
    with denormals_as_zero(False):
        assert plain.run(["y"], x)[0][0] > 0
        assert factory.run(["y"], x)[0][0] == 0
        assert halve(x["x"])[0] > 0
