"""Graph rewrites for the int8 export, after export/conv_fold.py: what the attention does to the
q, k and v projections, done by the projections' weights instead.

Once ACmix's convolution path is one dense convolution (conv_fold), the three 1x1 projections of
each layer feed the attention only, so their weights are free to take on what the attention does
next to their outputs:

* **head order.** The exported projections order their output channels [groups, head, group_dims]
  for the fp32 graph's grouped convolutions (model/alexnet.py); the attention reorders them to
  [head, dims] by a Reshape, a Transpose and a Reshape. Permuting the projection's output channels
  instead leaves one Reshape: on an AMD EPYC (AVX-512 VNNI) each of those nine int8 transposes took
  ~0.5 ms per batch of 128 (docs/inference_speed.md, "INT8").
* **scalar factors.** q's 1/sqrt(head_dim) and rate1, the attention output's weight, are products
  with a constant scalar. The attention is linear in q (up to the softmax's input) and in v, so the
  factor moves into the projection's weights and bias, and the Mul, with its Q/DQ pair in the int8
  graph, goes.

Exact algebra on the fp32 graph (up to float rounding), NumPy and onnx only, like conv_fold.
"""

from __future__ import annotations

import numpy as np

from runtime.onnx_graph import constant, drop_unused_initializers, index, initializer_arrays, is_projection, permutation

# Ops through which a product with a scalar moves unchanged (the tensor passes by reshaping,
# transposing, or as one factor of a matrix product).
_LINEAR = {"Reshape", "Transpose", "MatMul"}


def _set_initializer(graph, initializers: dict, name: str, value: np.ndarray) -> str:
    """A new initializer holding `value`, named after `name`, also entered in `initializers`;
    returns its name."""
    from onnx import numpy_helper

    new = f"{name}_folded{len(graph.initializer)}"
    value = value.astype(np.float32)
    graph.initializer.append(numpy_helper.from_array(value, new))
    initializers[new] = value
    return new


def _projection_bias(node, initializers) -> np.ndarray:
    weight = initializers[node.input[1]]
    if len(node.input) > 2 and node.input[2]:
        return initializers[node.input[2]]
    return np.zeros(weight.shape[0], np.float32)


def _replace_projection(graph, initializers: dict, conv, weight: np.ndarray, bias: np.ndarray) -> None:
    """Give the 1x1 projection `conv` new weights and bias, as new initializers."""
    conv.input[1] = _set_initializer(graph, initializers, conv.input[1], weight)
    if len(conv.input) > 2:
        conv.input[2] = _set_initializer(graph, initializers, conv.input[2] or conv.name, bias)
    else:
        conv.input.append(_set_initializer(graph, initializers, conv.name, bias))


def reorder_heads(model) -> int:
    """Rewrite, in place, each 1x1 projection whose only consumer is Reshape [0, G, H, D, L] ->
    Transpose [0, 2, 1, 3, 4] -> Reshape [0, H, G * D, L] so that its output channels come in the
    order (H, G, D), and drop the first Reshape and the Transpose; returns how many changed."""
    graph = model.graph
    initializers = initializer_arrays(graph)
    producer, consumers = index(graph)
    changed = 0
    for conv in list(graph.node):
        if not is_projection(conv, initializers):
            continue
        users = consumers.get(conv.output[0], [])
        if len(users) != 1 or users[0].op_type != "Reshape":
            continue
        split = users[0]
        shape = constant(split.input[1], initializers, producer)
        after = consumers.get(split.output[0], [])
        if shape is None or len(shape) != 5 or len(after) != 1 or after[0].op_type != "Transpose":
            continue
        transpose = after[0]
        if permutation(transpose) != [0, 2, 1, 3, 4]:
            continue
        merge = consumers.get(transpose.output[0], [])
        if len(merge) != 1 or merge[0].op_type != "Reshape":
            continue
        merge = merge[0]
        groups, heads, dims = (int(v) for v in shape[1:4])
        weight = initializers[conv.input[1]]
        if groups * heads * dims != weight.shape[0]:
            continue
        # new channel (h, g, d) is old channel (g, h, d)
        order = np.arange(weight.shape[0]).reshape(groups, heads, dims).transpose(1, 0, 2).reshape(-1)
        _replace_projection(graph, initializers, conv, weight[order], _projection_bias(conv, initializers)[order])
        merge.input[0] = conv.output[0]
        graph.node.remove(split)
        graph.node.remove(transpose)
        changed += 1
    if changed:
        drop_unused_initializers(graph)
    return changed


def _projection_behind(tensor: str, producer: dict, consumers: dict, initializers: dict):
    """The 1x1 projection whose output reaches `tensor` through single-consumer Reshape, Transpose or
    MatMul nodes only (so that scaling it scales `tensor`), or None."""
    while True:
        if len(consumers.get(tensor, [])) != 1:
            return None
        node = producer.get(tensor)
        if node is None:
            return None
        if is_projection(node, initializers):
            return node
        if node.op_type not in _LINEAR:
            return None
        candidates = [node.input[0]] if node.op_type != "MatMul" else list(node.input[:2])
        found = [c for c in candidates if _projection_behind(c, producer, consumers, initializers) is not None]
        if len(found) != 1:
            return None
        tensor = found[0]


def fold_scalar_factors(model) -> int:
    """Rewrite, in place, each Mul of a tensor by a constant scalar whose tensor comes from a 1x1
    projection through single-consumer Reshape, Transpose or MatMul nodes: the projection's weights
    and bias take the factor, the Mul goes. Returns how many changed."""
    graph = model.graph
    initializers = initializer_arrays(graph)
    producer, consumers = index(graph)
    outputs = {o.name for o in graph.output}
    changed = 0
    for mul in [n for n in graph.node if n.op_type == "Mul"]:
        values = [constant(name, initializers, producer) for name in mul.input]
        scalar = [i for i, v in enumerate(values) if v is not None and v.size == 1]
        if len(scalar) != 1 or mul.output[0] in outputs:
            continue
        tensor = mul.input[1 - scalar[0]]
        conv = _projection_behind(tensor, producer, consumers, initializers)
        if conv is None:
            continue
        factor = float(values[scalar[0]].reshape(-1)[0])
        weight, bias = initializers[conv.input[1]], _projection_bias(conv, initializers)
        _replace_projection(graph, initializers, conv, weight * factor, bias * factor)
        users = consumers.pop(mul.output[0], [])
        for user in users:
            for i, name in enumerate(user.input):
                if name == mul.output[0]:
                    user.input[i] = tensor
        consumers[tensor] = [n for n in consumers[tensor] if n is not mul] + users
        graph.node.remove(mul)
        changed += 1
    if changed:
        drop_unused_initializers(graph)
    return changed


def fold_into_projections(model) -> int:
    """reorder_heads then fold_scalar_factors; returns how many rewrites were made."""
    return reorder_heads(model) + fold_scalar_factors(model)
