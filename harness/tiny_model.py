"""A tiny ONNX model with the real contract (`image` [batch, 3, 128, 128] -> `logits` [batch, 10]).

Conv -> Reshape -> Add(mask of -1e4) -> Softmax -> MatMul -> Flatten -> MatMul -> Add: the ops and
the masking constant of the attention in AlexNet-ACmix, small enough to build and run in
microseconds. Tests use it where the real model is not the point; the service-ceiling benchmark
serves it so that inference costs next to nothing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from model.spec import INPUT_NAME, INPUT_SHAPE, NUM_CLASSES, OUTPUT_NAME

MASKED = -1e4


def tiny_model(seed: int = 0):
    """An fp32 onnx.ModelProto, opset 17, with a dynamic batch dimension called `batch`."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    positions = (INPUT_SHAPE[1] // 8) * (INPUT_SHAPE[2] // 8)
    mask = np.zeros((1, 1, positions), np.float32)
    mask[..., positions // 2 :] = MASKED  # half of the positions never get attention

    def init(name, array):
        return numpy_helper.from_array(np.asarray(array, np.float32 if array.dtype.kind == "f" else array.dtype), name)

    initializers = [
        init("conv_w", rng.normal(0, 0.2, (4, 3, 8, 8))),
        init("conv_b", rng.normal(0, 0.1, 4)),
        init("shape", np.array([0, 4, -1], np.int64)),
        init("mask", mask),
        init("values", rng.normal(0, 1, (positions, 8))),
        init("fc_w", rng.normal(0, 0.3, (32, NUM_CLASSES))),
        init("fc_b", rng.normal(0, 0.1, NUM_CLASSES)),
    ]
    nodes = [
        helper.make_node("Conv", [INPUT_NAME, "conv_w", "conv_b"], ["conv"], name="conv", strides=[8, 8]),
        helper.make_node("Reshape", ["conv", "shape"], ["flat"], name="reshape"),
        helper.make_node("Add", ["flat", "mask"], ["masked"], name="mask_add"),
        helper.make_node("Softmax", ["masked"], ["attn"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["attn", "values"], ["mixed"], name="mix"),
        helper.make_node("Flatten", ["mixed"], ["features"], name="flatten", axis=1),
        helper.make_node("MatMul", ["features", "fc_w"], ["fc"], name="fc"),
        helper.make_node("Add", ["fc", "fc_b"], [OUTPUT_NAME], name="fc_add"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_acmix",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", *INPUT_SHAPE])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", NUM_CLASSES])],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])




def write_tiny_model(path: str | Path, seed: int = 0) -> Path:
    import onnx

    model = tiny_model(seed)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return Path(path)
