"""The feature layers over the batch in chunks (runtime/batch_chunks.py), as one-thread CPU sessions run them."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from runtime.batch_chunks import CHUNK, in_batch_chunks
from runtime.onnxruntime import create_session
from tests.conftest import images, run_onnx


def optimized_ops(graph, tmp_path: Path, name: str) -> Counter:
    """(domain, op) counts of the graph ONNX Runtime runs for `graph` (bytes), loop bodies included."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / name)
    ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    counts, graphs = Counter(), [onnx.load(str(tmp_path / name)).graph]
    while graphs:
        for node in graphs.pop().node:
            counts[(node.domain, node.op_type)] += 1
            graphs.extend(a.g for a in node.attribute if a.name == "body")
    return counts


def test_a_one_thread_session_runs_the_acmix_features_in_chunks_with_the_same_logits(onnx_model):
    import onnx

    chunked = in_batch_chunks(onnx_model.read_bytes())
    onnx.checker.check_model(onnx.ModelProto.FromString(chunked), full_check=True)
    session = create_session(onnx_model, threads=1, providers=["CPUExecutionProvider"])
    assert session.batch_chunk == CHUNK == 16
    assert "Loop" in {node.op_type for node in onnx.ModelProto.FromString(chunked).graph.node}
    for batch in (1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 3):  # a partial last chunk, and none
        x = images(batch, seed=batch)
        got = session.run(["logits"], {"image": x})[0]
        expected = run_onnx(onnx_model, x)  # the file as written, in a plain session
        assert got.shape == expected.shape == (batch, 10)
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
        assert (got.argmax(1) == expected.argmax(1)).all()


def test_sessions_of_more_threads_run_the_file_as_written(onnx_model):
    assert create_session(onnx_model, threads=2, providers=["CPUExecutionProvider"]).batch_chunk is None
    assert create_session(onnx_model, providers=["CPUExecutionProvider"]).batch_chunk is None


def test_the_loop_keeps_onnx_runtimes_blocked_convolutions(onnx_model, tmp_path):
    """The weights move into the loop's body: left in the outer graph, ONNX Runtime's NCHWc layout
    did not block the body's convolutions, and the model ran 20% slower."""
    written = optimized_ops(onnx_model.read_bytes(), tmp_path, "written.onnx")
    chunked = optimized_ops(in_batch_chunks(onnx_model.read_bytes()), tmp_path, "chunked.onnx")
    assert chunked[("", "Loop")] == 1
    assert chunked[("com.microsoft.nchwc", "Conv")] == written[("com.microsoft.nchwc", "Conv")]
    assert chunked[("", "Conv")] == written[("", "Conv")]
    # its adds fused into the convolutions as outside a loop (shapes inferred inside the body)
    assert chunked[("", "Add")] == written[("", "Add")] + 2  # + the count of chunks and a chunk's end


def small_graph(*middle, feature_shape=(2, 4, 4, 4)):
    """image [batch, 3, 128, 128] -> Conv (4 channels, stride 32) -> middle nodes reading `conv` and
    writing `features` -> Reshape to [-1, 64] -> MatMul -> logits: a classifier over feature layers."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.1, (4, 3, 32, 32)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([-1, 64], np.int64), "flat"),
             numpy_helper.from_array(rng.normal(0, 0.1, (64, 10)).astype(np.float32), "fc"),
             numpy_helper.from_array(np.zeros(feature_shape, np.float32), "per_batch")]
    nodes = [helper.make_node("Conv", ["image", "w"], ["conv"], strides=[32, 32]), *middle,
             helper.make_node("Reshape", ["features", "flat"], ["flat_features"]),
             helper.make_node("MatMul", ["flat_features", "fc"], ["logits"])]
    graph = helper.make_graph(nodes, "small", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 128, 128])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def test_graphs_with_attention_per_image_are_chunked_with_the_same_logits(tmp_path):
    from onnx import helper

    data = small_graph(helper.make_node("Softmax", ["conv"], ["features"], axis=-1))
    chunked = in_batch_chunks(data)
    assert chunked is not None
    x = images(CHUNK + 5)
    (tmp_path / "small.onnx").write_bytes(data)
    (tmp_path / "chunked.onnx").write_bytes(chunked)
    np.testing.assert_allclose(run_onnx(tmp_path / "chunked.onnx", x), run_onnx(tmp_path / "small.onnx", x), atol=1e-6)


@pytest.mark.parametrize("why, middle", [
    ("no attention: the plain AlexNet's convolutions lose in chunks", [("Relu", ["conv"], ["features"], {})]),
    ("a softmax over the batch", [("Softmax", ["conv"], ["features"], {"axis": 0})]),
    ("a softmax over the batch axis, moved there and back by transposes",
     [("Transpose", ["conv"], ["t"], {"perm": [1, 0, 2, 3]}), ("Softmax", ["t"], ["s"], {"axis": 1}),
      ("Transpose", ["s"], ["features"], {"perm": [1, 0, 2, 3]})]),
    ("a constant with its own batch axis", [("Softmax", ["conv"], ["s"], {}), ("Add", ["s", "per_batch"], ["features"], {})]),
    ("an operation not known to be per image", [("Softmax", ["conv"], ["s"], {}), ("ReduceMean", ["s"], ["features"], {"keepdims": 1, "axes": [0]})]),
])
def test_graphs_whose_features_are_not_per_image_attention_run_as_written(why, middle):
    from onnx import helper

    data = small_graph(*(helper.make_node(op, inputs, outputs, **attrs) for op, inputs, outputs, attrs in middle))
    assert in_batch_chunks(data) is None, why
