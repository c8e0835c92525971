"""The feature layers over the batch in chunks (runtime/batch_chunks.py), as one-thread CPU sessions run them."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from runtime.batch_chunks import CHUNK, in_batch_chunks, subgraphs
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
            graphs.extend(subgraphs(node))
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


def test_one_chunked_session_answers_concurrent_batches_each_its_own(onnx_model):
    """A service process with two batches at once shares one session (service/settings.py); the
    loop's chunks of one call never mix with another's."""
    from concurrent.futures import ThreadPoolExecutor

    session = create_session(onnx_model, threads=1, providers=["CPUExecutionProvider"])
    batches = [images(n, seed=n) for n in (3, CHUNK + 9, 2 * CHUNK, 7)]
    expected = [run_onnx(onnx_model, x) for x in batches]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda x: session.run(["logits"], {"image": x})[0], batches * 3))
    for i, logits in enumerate(got):
        np.testing.assert_allclose(logits, expected[i % len(batches)], atol=1e-4, rtol=0)


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


def small_graph(*middle, extra=()):
    """image [batch, 3, 128, 128] -> Conv (4 channels, stride 32) -> middle nodes reading `conv` and
    writing `features` -> Reshape to [-1, 64] -> MatMul -> logits: a classifier over feature layers.
    `extra`: more initializers, as (name, array)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    arrays = {"w": rng.normal(0, 0.1, (4, 3, 32, 32)).astype(np.float32), "flat": np.array([-1, 64], np.int64),
              "fc": rng.normal(0, 0.1, (64, 10)).astype(np.float32), "back": np.array([-1, 4, 4, 4], np.int64),
              **dict(extra)}
    nodes = [helper.make_node("Conv", ["image", "w"], ["conv"], strides=[32, 32]), *middle,
             helper.make_node("Reshape", ["features", "flat"], ["flat_features"]),
             helper.make_node("MatMul", ["flat_features", "fc"], ["logits"])]
    graph = helper.make_graph(nodes, "small", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 128, 128])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
                              [numpy_helper.from_array(a, name) for name, a in arrays.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def node(op, inputs, outputs, **attrs):
    from onnx import helper

    return helper.make_node(op, inputs, outputs, **attrs)


def assert_same_logits(data: bytes, chunked: bytes, batch: int, tmp_path: Path):
    x = images(batch)
    (tmp_path / "written.onnx").write_bytes(data)
    (tmp_path / "chunked.onnx").write_bytes(chunked)
    np.testing.assert_allclose(run_onnx(tmp_path / "chunked.onnx", x), run_onnx(tmp_path / "written.onnx", x), atol=1e-6)


@pytest.mark.parametrize("why, middle, extra", [
    ("a softmax per image", [node("Softmax", ["conv"], ["features"], axis=-1)], ()),
    ("a constant operand first, broadcast over the batch (as ACmix's rate1)",
     [node("Softmax", ["conv"], ["s"]), node("Mul", ["half", "s"], ["features"])], [("half", np.full((1, 4, 1, 1), 0.5, np.float32))]),
    ("a reshape keeping one image per row", [node("Softmax", ["conv"], ["s"]), node("Reshape", ["s", "row"], ["r"]),
                                             node("Reshape", ["r", "back"], ["features"])], [("row", np.array([-1, 64], np.int64))]),
    ("tensors named like the rewrite's own", [node("Softmax", ["conv"], ["batch_chunks/first"]),
                                             node("Identity", ["batch_chunks/first"], ["features"])], ()),
])
def test_graphs_with_attention_per_image_are_chunked_with_the_same_logits(why, middle, extra, tmp_path):
    data = small_graph(*middle, extra=extra)
    chunked = in_batch_chunks(data)
    assert chunked is not None, why
    assert_same_logits(data, chunked, CHUNK + 5, tmp_path)


@pytest.mark.parametrize("why, middle, extra", [
    ("no attention: the plain AlexNet's convolutions lose in chunks", [node("Relu", ["conv"], ["features"])], ()),
    ("a softmax over the batch", [node("Softmax", ["conv"], ["features"], axis=0)], ()),
    ("a softmax over the batch axis, moved there and back by transposes",
     [node("Transpose", ["conv"], ["t"], perm=[1, 0, 2, 3]), node("Softmax", ["t"], ["s"], axis=1),
      node("Transpose", ["s"], ["features"], perm=[1, 0, 2, 3])], ()),
    ("a constant with its own batch axis", [node("Softmax", ["conv"], ["s"]), node("Add", ["s", "per_batch"], ["features"])],
     [("per_batch", np.zeros((2, 4, 4, 4), np.float32))]),
    ("a constant of higher rank that moves the batch to axis 1, a softmax then over it",
     [node("Add", ["conv", "zero5"], ["c5"]), node("Softmax", ["c5"], ["s"], axis=1), node("Reshape", ["s", "back"], ["features"])],
     [("zero5", np.zeros((1, 1, 1, 1, 1), np.float32))]),
    ("a product whose right-hand side is the batch of rows: it sums over the images",
     [node("Reshape", ["conv", "row"], ["x"]), node("Softmax", ["x"], ["s"], axis=1), node("MatMul", ["ones", "s"], ["m"]),
      node("Reshape", ["m", "back"], ["features"])],
     [("row", np.array([-1, 64], np.int64)), ("ones", np.ones((1, 32), np.float32))]),
    ("a reshape with -1 first that puts 3 images in a row",
     [node("Reshape", ["conv", "three"], ["x"]), node("Softmax", ["x"], ["s"], axis=1), node("Reshape", ["s", "back"], ["features"])],
     [("three", np.array([-1, 3, 64], np.int64))]),
    ("an operation not known to be per image", [node("Softmax", ["conv"], ["s"]),
                                                node("ReduceMean", ["s"], ["features"], keepdims=1, axes=[0])], ()),
])
def test_graphs_whose_features_are_not_per_image_attention_run_as_written(why, middle, extra):
    assert in_batch_chunks(small_graph(*middle, extra=extra)) is None, why


@pytest.mark.parametrize("failure", ["the rewrite raises", "ONNX Runtime refuses the rewritten graph"])
def test_a_graph_the_rewrite_cannot_handle_runs_as_written_with_a_warning(failure, onnx_model, monkeypatch, caplog):
    import runtime.onnxruntime

    def fails(graph):  # a fake of the rewrite, for create_session's logic
        if failure == "the rewrite raises":
            raise ValueError("a graph it cannot handle")
        return b"not a graph"

    monkeypatch.setattr(runtime.onnxruntime, "in_batch_chunks", fails)
    session = create_session(onnx_model, threads=1, providers=["CPUExecutionProvider"])
    assert session.batch_chunk is None
    assert "feature layers on the whole batch, not in chunks (" in caplog.text
    assert ("ValueError: a graph it cannot handle" in caplog.text) == (failure == "the rewrite raises")
    np.testing.assert_allclose(session.run(["logits"], {"image": images(2)})[0], run_onnx(onnx_model, images(2)), atol=1e-4)


def test_a_weight_that_a_subgraph_of_the_classifier_reads_too_stays_in_the_outer_graph(tmp_path):
    """The features add `b`, and so does each branch of an If in the classifier: `b` must stay where
    the branches can read it (moved into the loop's body, ONNX Runtime refused the graph)."""
    import onnx
    from onnx import TensorProto, helper

    def branch(name):
        return helper.make_graph([node("Add", ["product", "b"], [name])], name, [],
                                 [helper.make_tensor_value_info(name, TensorProto.FLOAT, None)])

    middle = [node("Add", ["conv", "b"], ["shifted"]), node("Softmax", ["shifted"], ["features"])]
    data = small_graph(*middle, extra=[("b", np.array([0.5], np.float32)), ("yes", np.array(True))])
    model = onnx.ModelProto.FromString(data)
    classifier = model.graph.node[-1]
    classifier.output[0] = "product"
    model.graph.node.append(node("If", ["yes"], ["logits"], then_branch=branch("then"), else_branch=branch("else")))
    data = model.SerializeToString()
    chunked = in_batch_chunks(data)
    assert chunked is not None
    assert_same_logits(data, chunked, CHUNK + 2, tmp_path)
