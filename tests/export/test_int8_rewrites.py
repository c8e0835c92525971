"""The int8 source graph (export/int8.py `int8_source_graph`): after conv_fold, the projections take
the attention's reordering and scalar factors (projection_fold) and the attention and classifier
read channels-last (channels_last). Each rewrite keeps the network's logits."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from export.channels_last import attention_channels_last, flatten_channels_last
from export.conv_fold import fold_grouped_convolutions
from export.int8 import int8_source_graph
from export.projection_fold import fold_scalar_factors, reorder_heads


def same_logits(original, model, tmp_path, name: str) -> None:
    from tests.conftest import images, run_onnx

    path = tmp_path / f"{name}.onnx"
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    batch = images(8, seed=3)
    expected = run_onnx(original, batch)
    np.testing.assert_allclose(run_onnx(path, batch), expected, atol=1e-4 * np.abs(expected).max(), rtol=0)


def test_each_rewrite_keeps_the_logits_and_removes_what_it_says(onnx_model, tmp_path):
    model = onnx.load(str(onnx_model))
    assert reorder_heads(model) == 0  # the grouped convolutions still read the projections
    assert fold_grouped_convolutions(model) == 3
    before = Counter(n.op_type for n in model.graph.node)

    assert reorder_heads(model) == 9  # q, k and v of three layers
    heads = Counter(n.op_type for n in model.graph.node)
    assert (heads["Transpose"], heads["Reshape"]) == (before["Transpose"] - 9, before["Reshape"] - 9)
    same_logits(onnx_model, model, tmp_path, "heads")

    assert fold_scalar_factors(model) == 6  # q's 1/sqrt(head_dim) and rate1, per layer
    scalars = Counter(n.op_type for n in model.graph.node)
    assert scalars["Mul"] == before["Mul"] - 6 and scalars["Conv"] == before["Conv"]
    same_logits(onnx_model, model, tmp_path, "scalars")

    assert attention_channels_last(model) == 6  # q^T @ k and v @ attn^T, per layer
    same_logits(onnx_model, model, tmp_path, "attention")
    assert flatten_channels_last(model) == 1  # the classifier's first product
    same_logits(onnx_model, model, tmp_path, "flatten")

    again = onnx.load(str(onnx_model))
    int8_source_graph(again)
    assert Counter(n.op_type for n in again.graph.node) == Counter(n.op_type for n in model.graph.node)


def scalar_graph(between: str) -> onnx.ModelProto:
    """x -> 1x1 Conv -> `between` -> Mul by 3 -> Identity -> y."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((4, 2, 1, 1)).astype(np.float32), "w")
    bias = numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b")
    three = numpy_helper.from_array(np.array([3.0], np.float32), "three")
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["p"]), helper.make_node(between, ["p"], ["t"]),
             helper.make_node("Mul", ["t", "three"], ["m"]), helper.make_node("Identity", ["m"], ["y"])]
    if between == "Softmax":
        nodes[1].attribute.append(helper.make_attribute("axis", 1))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [weight, bias, three])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_scalar_moves_into_the_projection_through_linear_ops_only():
    import onnxruntime as ort

    x = np.random.default_rng(1).standard_normal((1, 2, 3, 3)).astype(np.float32)
    assert fold_scalar_factors(scalar_graph("Relu")) == 0  # not linear
    through_softmax = scalar_graph("Softmax")
    assert fold_scalar_factors(through_softmax) == 0  # 3 * softmax(p) is not softmax(3p)
    transposed = scalar_graph("Transpose")
    expected = ort.InferenceSession(transposed.SerializeToString()).run(None, {"x": x})[0]
    assert fold_scalar_factors(transposed) == 1 and "Mul" not in {n.op_type for n in transposed.graph.node}
    got = ort.InferenceSession(transposed.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
