"""Small helpers the ONNX graph rewrites share (export: conv_fold, projection_fold, channels_last;
runtime: int8_cpu_graph): who produces and who reads each tensor, a node's attributes, constants,
the 1x1 projections, unused initializers."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np


def read_onnx(path):
    """The ModelProto of an ONNX file; ValueError naming the file where it is missing or not ONNX."""
    import onnx

    if not Path(path).is_file():
        raise ValueError(f"{path}: no such ONNX file")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf's DecodeError and others, for bytes that are no ONNX
        raise ValueError(f"{path}: not an ONNX file ({type(exc).__name__})") from None
    if not model.graph.node:
        raise ValueError(f"{path}: not an ONNX file (no graph)")
    return model


def attributes(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def permutation(node) -> list[int]:
    """A Transpose node's perm attribute ([] if it has none)."""
    return list(attributes(node).get("perm", []))


def index(graph) -> tuple[dict, dict]:
    """(producer of each tensor, readers of each tensor)."""
    producer = {o: n for n in graph.node for o in n.output}
    readers = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            readers[name].append(node)
    return producer, readers


def initializer_arrays(graph) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {i.name: numpy_helper.to_array(i) for i in graph.initializer}


def constant(name: str, initializers: dict, producer: dict) -> np.ndarray | None:
    """The value of `name` if it is an initializer or a Constant node's output, else None."""
    if name in initializers:
        return initializers[name]
    node = producer.get(name)
    if node is not None and node.op_type == "Constant":
        from onnx import numpy_helper

        return numpy_helper.to_array(node.attribute[0].t)
    return None


def is_projection(node, initializers) -> bool:
    """A 1x1 convolution, stride 1, no padding, one group, constant weights."""
    if node.op_type != "Conv" or node.input[1] not in initializers:
        return False
    attrs = attributes(node)
    weight = initializers[node.input[1]]
    return (weight.ndim == 4 and weight.shape[2:] == (1, 1) and attrs.get("group", 1) == 1
            and set(attrs.get("strides", [1, 1])) == {1} and set(attrs.get("pads", [0, 0, 0, 0])) == {0}
            and attrs.get("auto_pad", "NOTSET") == "NOTSET")


def drop_unused_initializers(graph) -> None:
    used = {name for node in graph.node for name in node.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
