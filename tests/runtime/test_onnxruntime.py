"""The one ONNX Runtime session factory: the options every session (service, verification, benchmarks) gets."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from runtime.backend import BackendError
from runtime.onnxruntime import SESSION_CONFIG, OnnxRuntimeBackend, create_session

ROOT = Path(__file__).resolve().parents[2]


def test_sessions_set_denormals_as_zero_and_no_spinning(tiny_onnx):
    options = create_session(tiny_onnx, threads=1).get_session_options()
    assert options.get_session_config_entry("session.set_denormal_as_zero") == "1"
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.intra_op_num_threads == 1 and options.inter_op_num_threads == 1
    assert SESSION_CONFIG == {"session.set_denormal_as_zero": "1", "session.intra_op.allow_spinning": "0"}


def test_the_service_backend_uses_the_factory(tiny_onnx):
    with OnnxRuntimeBackend(tiny_onnx, max_batch=4, threads=1) as backend:
        assert backend.session.get_session_options().get_session_config_entry("session.set_denormal_as_zero") == "1"


def test_no_other_code_makes_its_own_session():
    """Every InferenceSession of the project comes from create_session (artifacts.py only reads
    metadata, without running the graph); the tests' oracle is an independent plain session."""
    makers = []
    for folder in ("runtime", "export", "service", "benchmarks", "harness", "model"):
        for source in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(source.read_text())):
                if isinstance(node, ast.Attribute) and node.attr == "InferenceSession":
                    makers.append(source.relative_to(ROOT).as_posix())
    assert sorted(set(makers)) == ["runtime/artifacts.py", "runtime/onnxruntime.py"]


def test_a_missing_or_corrupt_file_is_named(tmp_path):
    with pytest.raises(BackendError, match="no such ONNX file"):
        create_session(tmp_path / "none.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"\0garbage")
    with pytest.raises(BackendError, match="bad.onnx: ONNX Runtime cannot load it"):
        create_session(tmp_path / "bad.onnx")


def relu_qdq_graph(second_reader: str | None = None):
    """x -> Relu -> MaxPool -> QuantizeLinear (uint8, zero point 128) -> DequantizeLinear -> y, as
    unsigned_activations leaves an int8 file on the CPU; optionally a second reader of the Relu."""
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "s"), numpy_helper.from_array(np.array(128, np.uint8), "z")]
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["m"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("QuantizeLinear", ["m", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if second_reader:
        nodes.append(helper.make_node(second_reader, ["r", "r"], ["other"]))
        outputs.append(helper.make_tensor_value_info("other", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4, 4])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_relu_before_a_quantization_becomes_its_zero_point():
    """relu_into_quantize: zero point 0 makes the uint8 quantization clamp at 0, which is the ReLU;
    within the calibrated range the values are the same as with the ReLU (a plain session is the
    oracle)."""
    import onnxruntime as ort

    from runtime.int8_cpu_graph import relu_into_quantize

    x = np.random.default_rng(0).uniform(-6, 3, (2, 3, 4, 4)).astype(np.float32)  # within 127 steps of 0.05
    model = relu_qdq_graph()
    expected = ort.InferenceSession(model.SerializeToString()).run(["y"], {"x": x})[0]
    assert relu_into_quantize(model) == 1
    assert "Relu" not in {n.op_type for n in model.graph.node}
    got = ort.InferenceSession(model.SerializeToString()).run(["y"], {"x": x})[0]
    np.testing.assert_array_equal(got, expected)
    assert (got == 0).any()  # negative inputs were there and were clamped


def test_a_relu_with_another_reader_stays():
    from runtime.int8_cpu_graph import relu_into_quantize

    model = relu_qdq_graph(second_reader="Add")
    assert relu_into_quantize(model) == 0 and "Relu" in {n.op_type for n in model.graph.node}


def test_creating_the_first_session_leaves_the_threads_floating_point_mode_alone(tiny_onnx):
    """ONNX Runtime sets denormals as zero in the thread that creates the process's first session;
    in the service that thread is the event loop's. A fresh process: only its first session does it."""
    import subprocess
    import sys

    code = ("import sys; from runtime.onnxruntime import create_session; "
            "create_session(sys.argv[1], threads=1); print(float('5e-324') > 0)")
    result = subprocess.run([sys.executable, "-c", code, str(tiny_onnx)], cwd=ROOT, capture_output=True, text=True,
                            timeout=120, check=True)
    assert result.stdout.split() == ["True"]
