"""Graph rewrites for the int8 export, after export/projection_fold.py: the attention and the
classifier read the projections and the last feature map channels-last.

ONNX Runtime runs int8 convolutions channels-last (NHWC) and inserts a Transpose wherever an NCHW
consumer reads their output, and another before each int8 convolution whose input is NCHW. The
exported attention reads q, k and v as [B, head, dims, L], which is NCHW, and transposes q and the
attention weights for its two matrix products; its output is added to the convolution path's
(NHWC) output. Rewritten here, for the attention of each ACmix layer:

    q^T = Transpose(Reshape(Transpose(q_proj, to NHWC), [B, L, head, dims]))      [B, head, L, dims]
    out^T = attn @ v^T    (v^T as q^T)                                            [B, head, L, dims]
    out = Transpose(Reshape(Transpose(out^T), [B, h, w, C]), to NCHW)

and the classifier reads the last map flattened channels-last, its first weight's rows permuted
to match. The transposes to and from NHWC written here meet the ones ONNX Runtime inserts and
cancel, so one transpose is left per product operand instead of two, and the convolution path,
the sum and the ReLU stay NHWC between layers: 30 transposes became 15, int8 throughput +5-11% at
batch 32 and 128 on an AMD EPYC (AVX-512 VNNI; docs/inference_speed.md, "INT8"). Measured worse in fp32 (session 9),
so the fp32 file keeps its form.

Exact algebra (the same products in another layout), NumPy and onnx only, like conv_fold.
"""

from __future__ import annotations

import numpy as np

from runtime.onnx_graph import constant, drop_unused_initializers, index, initializer_arrays, permutation

TO_NHWC, TO_NCHW = [0, 2, 3, 1], [0, 3, 1, 2]
SWAP_LAST, SWAP_MIDDLE = [0, 1, 3, 2], [0, 2, 1, 3]


class _Writer:
    """Adds nodes before an anchor node and int64 shape constants, with unique names."""

    def __init__(self, graph):
        self.graph = graph
        self.count = 0

    def name(self, what: str) -> str:
        self.count += 1
        return f"channels_last_{what}_{self.count}"

    def shape(self, values: list[int]) -> str:
        from onnx import numpy_helper

        name = self.name("shape")
        self.graph.initializer.append(numpy_helper.from_array(np.array(values, np.int64), name))
        return name

    def insert_before(self, anchor, nodes) -> None:
        position = list(self.graph.node).index(anchor)
        for offset, node in enumerate(nodes):
            self.graph.node.insert(position + offset, node)

    def tokens(self, projection: str, heads: int, dims: int, length: int) -> tuple[list, str]:
        """Nodes taking a [B, heads * dims, h, w] projection to [B, heads, L, dims]; their output."""
        from onnx import helper

        nhwc, split, out = self.name("nhwc"), self.name("split"), self.name("tokens")
        return [helper.make_node("Transpose", [projection], [nhwc], perm=TO_NHWC),
                helper.make_node("Reshape", [nhwc, self.shape([0, length, heads, dims])], [split]),
                helper.make_node("Transpose", [split], [out], perm=SWAP_MIDDLE)], out


def _head_split(node, initializers, producer, consumers) -> tuple[int, int, int] | None:
    """(heads, dims, L) if `node` is a single-consumer Reshape of a projection to [0, heads, dims, L]."""
    if node is None or node.op_type != "Reshape" or len(consumers.get(node.output[0], [])) != 1:
        return None
    shape = constant(node.input[1], initializers, producer)
    if shape is None or len(shape) != 4 or int(shape[0]) != 0:
        return None
    return int(shape[1]), int(shape[2]), int(shape[3])


def attention_channels_last(model) -> int:
    """Rewrite, in place, each attention's q^T @ k and v @ attn^T products to read the projections
    channels-last (module docstring); returns how many products changed."""
    from onnx import helper

    graph = model.graph
    initializers = initializer_arrays(graph)
    producer, consumers = index(graph)
    writer = _Writer(graph)
    changed = 0
    for matmul in [n for n in graph.node if n.op_type == "MatMul"]:
        left, right = (producer.get(name) for name in matmul.input[:2])
        # q^T @ (k - pe): left is Transpose(0, 1, 3, 2) of the head split of q's projection
        if left is not None and left.op_type == "Transpose" and permutation(left) == SWAP_LAST:
            split = producer.get(left.input[0])
            found = _head_split(split, initializers, producer, consumers)
            if found and len(consumers.get(left.output[0], [])) == 1:
                nodes, tokens = writer.tokens(split.input[0], *found)
                writer.insert_before(matmul, nodes)
                matmul.input[0] = tokens
                graph.node.remove(left)
                graph.node.remove(split)
                changed += 1
                continue
        # v @ attn^T, then Reshape to [0, C, h, w]: left is the head split of v's projection
        if right is None or right.op_type != "Transpose" or permutation(right) != SWAP_LAST:
            continue
        found = _head_split(left, initializers, producer, consumers)
        users = consumers.get(matmul.output[0], [])
        if not found or len(users) != 1 or users[0].op_type != "Reshape":
            continue
        merge = users[0]
        shape = constant(merge.input[1], initializers, producer)
        if shape is None or len(shape) != 4 or len(consumers.get(right.output[0], [])) != 1:
            continue
        channels, height, width = (int(v) for v in shape[1:])
        nodes, tokens = writer.tokens(left.input[0], *found)
        product, swapped, nhwc = writer.name("product"), writer.name("swapped"), writer.name("map")
        nodes += [helper.make_node("MatMul", [right.input[0], tokens], [product], name=matmul.name),
                  helper.make_node("Transpose", [product], [swapped], perm=SWAP_MIDDLE),
                  helper.make_node("Reshape", [swapped, writer.shape([0, height, width, channels])], [nhwc]),
                  helper.make_node("Transpose", [nhwc], [merge.output[0]], perm=TO_NCHW)]
        writer.insert_before(matmul, nodes)
        for node in (left, right, matmul, merge):
            graph.node.remove(node)
        changed += 1
    if changed:
        drop_unused_initializers(graph)
    return changed


def flatten_channels_last(model) -> int:
    """Rewrite, in place, each Reshape of a [B, C, h, w] map to [B, C*h*w] read only by a MatMul with a
    constant weight: the map is flattened channels-last and the weight's rows permuted to match.
    Returns how many changed."""
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in inferred.graph.value_info}
    initializers = initializer_arrays(graph)
    producer, consumers = index(graph)
    writer = _Writer(graph)
    changed = 0
    for reshape in [n for n in graph.node if n.op_type == "Reshape"]:
        users = consumers.get(reshape.output[0], [])
        shape = shapes.get(reshape.input[0])
        if len(users) != 1 or users[0].op_type != "MatMul" or users[0].input[1] not in initializers:
            continue
        if not shape or len(shape) != 4 or 0 in shape[1:]:
            continue
        matmul = users[0]
        weight = initializers[matmul.input[1]]
        channels, height, width = shape[1:]
        if users[0].input[0] != reshape.output[0] or weight.shape[0] != channels * height * width:
            continue
        rows = weight.reshape(channels, height, width, -1).transpose(1, 2, 0, 3).reshape(weight.shape)
        name = f"{matmul.input[1]}_channels_last"
        graph.initializer.append(numpy_helper.from_array(rows, name))
        matmul.input[1] = name
        nhwc = f"{reshape.input[0]}_channels_last"
        writer.insert_before(reshape, [helper.make_node("Transpose", [reshape.input[0]], [nhwc], perm=TO_NHWC)])
        reshape.input[0] = nhwc
        changed += 1
    if changed:
        drop_unused_initializers(graph)
    return changed
