"""A graph rewrite for the int8 export: ACmix's convolution path as one dense convolution.

The fp32 graph computes ACmix's convolution path from the q, k and v projections (1x1
convolutions of the layer's input x, which the attention reads too) by one grouped 3x3
convolution per projection, summed (model/alexnet.py, `_project_and_convolve_for_export`). That is
the fastest fp32 form on the CPU, but ONNX Runtime's int8 kernels run grouped convolutions slowly:
on an AMD EPYC (AVX-512 VNNI) the nine grouped QLinearConv nodes took 24 ms of 69 ms per batch of
128, against 3 dense ones of about 2 ms each in the folded form (docs/inference_speed.md, "INT8").

Everything between x and the sum is linear, so

    sum_i grouped_conv_i(W_i x + b_i) = dense_conv(x) + B

with dense weights D[o] = sum over the projection channels c that output o reads of
G_i[o, c] (x) W_i[c], and B the constant map the biases give through the zero-padded grouped
convolutions (it differs at the border) plus the grouped convolutions' own biases. The folded
graph has one Conv and one Add of a constant per layer where it had three grouped Convs and two
Adds; the projections stay, for the attention. NumPy and onnx only, so that the int8 file can be
made from the fp32 ONNX alone (no Paddle), as every other derived artifact is.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from runtime.onnx_graph import attributes, drop_unused_initializers, index, initializer_arrays, is_projection


def _is_same_size_grouped(node, initializers) -> bool:
    """A grouped k x k convolution (k odd) that keeps the map size: stride 1, dilation 1, padding (k - 1) / 2."""
    if node.op_type != "Conv" or node.input[1] not in initializers:
        return False
    if len(node.input) > 2 and node.input[2] and node.input[2] not in initializers:
        return False
    attrs = attributes(node)
    weight = initializers[node.input[1]]
    k = weight.shape[2] if weight.ndim == 4 else 0
    return (attrs.get("group", 1) > 1 and k % 2 == 1 and weight.shape[3] == k
            and set(attrs.get("strides", [1, 1])) == {1} and set(attrs.get("dilations", [1, 1])) == {1}
            and list(attrs.get("pads", [0, 0, 0, 0])) == [k // 2] * 4 and attrs.get("auto_pad", "NOTSET") == "NOTSET")


def fold_weights(grouped: np.ndarray, groups: int, projection: np.ndarray) -> np.ndarray:
    """[out, in_x, k, k]: a grouped convolution ([out, in_g, k, k], `groups`) of a 1x1 projection ([in_g *
    groups, in_x, 1, 1]) as one convolution of the projection's input."""
    out, in_g = grouped.shape[:2]
    per_group = projection[:, :, 0, 0].reshape(groups, in_g, -1)
    read = per_group[np.arange(out) // (out // groups)]  # [out, in_g, in_x]: the channels each output reads
    return np.einsum("ocab,ocx->oxab", grouped.astype(np.float64), read.astype(np.float64))


def bias_map(grouped: np.ndarray, groups: int, projection_bias: np.ndarray, height: int, width: int) -> np.ndarray:
    """[out, H, W]: a grouped same-size convolution with zero padding of constant maps `projection_bias`."""
    out, in_g, k = grouped.shape[0], grouped.shape[1], grouped.shape[2]
    biases = projection_bias.reshape(groups, in_g)[np.arange(out) // (out // groups)]  # [out, in_g]
    per_tap = np.einsum("ocab,oc->oab", grouped.astype(np.float64), biases.astype(np.float64))
    pad = k // 2
    result = np.zeros((out, height, width))
    for a in range(k):
        for b in range(k):
            # Tap (a, b) reads position (y + a - pad, x + b - pad): only where that is on the map.
            ys = slice(max(0, pad - a), min(height, height + pad - a))
            xs = slice(max(0, pad - b), min(width, width + pad - b))
            result[:, ys, xs] += per_tap[:, a, b, None, None]
    return result


def _sum_tree(terms: set[str], consumers: dict) -> tuple[str, list] | None:
    """(tensor, Add nodes) where a chain of Add nodes sums exactly the tensors `terms`, each used once."""
    covered = {t: {t} for t in terms}
    adds = []
    frontier = list(terms)
    while frontier:
        tensor = frontier.pop()
        users = consumers.get(tensor, [])
        if len(users) != 1 or users[0].op_type != "Add":
            continue
        add = users[0]
        if add in adds or not all(x in covered for x in add.input):
            continue
        adds.append(add)
        covered[add.output[0]] = covered[add.input[0]] | covered[add.input[1]]
        if covered[add.output[0]] == terms:
            return add.output[0], adds
        frontier.append(add.output[0])
    return None


def fold_grouped_convolutions(model) -> int:
    """Rewrite, in place, every sum of grouped convolutions of 1x1 projections of one tensor into a
    dense convolution of that tensor plus a constant map; returns how many sums were folded.
    Needs the maps' spatial size from shape inference; sums it cannot prove equal are left alone."""
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    initializers = initializer_arrays(graph)
    producer, consumers = index(graph)

    by_input = defaultdict(list)  # x -> [(grouped conv, its projection)]
    for node in graph.node:
        projection = producer.get(node.input[0]) if node.input else None
        if (_is_same_size_grouped(node, initializers) and projection is not None
                and is_projection(projection, initializers)):
            by_input[projection.input[0]].append((node, projection))

    folded = 0
    for x, convolutions in by_input.items():
        found = _sum_tree({conv.output[0] for conv, _ in convolutions}, consumers)
        shape = shapes.get(convolutions[0][0].output[0])
        if found is None or not shape or len(shape) != 4 or 0 in shape[2:]:
            continue
        total, adds = found
        height, width = shape[2:]
        weight, constant = 0.0, 0.0
        for conv, projection in convolutions:
            grouped, groups = initializers[conv.input[1]], attributes(conv)["group"]
            project_w = initializers[projection.input[1]]
            project_b = (initializers[projection.input[2]] if len(projection.input) > 2 and projection.input[2]
                         else np.zeros(project_w.shape[0], np.float32))
            weight = weight + fold_weights(grouped, groups, project_w)
            constant = constant + bias_map(grouped, groups, project_b, height, width)
            if len(conv.input) > 2 and conv.input[2]:
                constant = constant + initializers[conv.input[2]].astype(np.float64)[:, None, None]
        name = f"{total}_dense"
        graph.initializer.extend([numpy_helper.from_array(weight.astype(np.float32), f"{name}_weight"),
                                  numpy_helper.from_array(constant[None].astype(np.float32), f"{name}_bias_map")])
        k = weight.shape[2]
        position = min(list(graph.node).index(conv) for conv, _ in convolutions)
        new_nodes = [helper.make_node("Conv", [x, f"{name}_weight"], [f"{name}_conv"], name=f"{name}_conv",
                                      kernel_shape=[k, k], pads=[k // 2] * 4),
                     helper.make_node("Add", [f"{name}_conv", f"{name}_bias_map"], [total], name=f"{name}_add")]
        for node in [conv for conv, _ in convolutions] + adds:
            graph.node.remove(node)
        for offset, node in enumerate(new_nodes):
            graph.node.insert(position + offset, node)
        folded += 1
    if folded:
        drop_unused_initializers(graph)
    return folded
