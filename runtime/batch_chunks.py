"""The feature layers over the batch in chunks of CHUNK images (in_batch_chunks), for ONNX Runtime
sessions of one thread on the CPU, rewritten in memory.

At batch 128, each of the ACmix layers' small operations (attention products, softmax, transposes,
adds, conversions out of ONNX Runtime's blocked layout) reads and writes a whole tensor of ~5 MB,
more than a core's L2 cache, and so waits on the shared cache and memory, which a second session
takes too (docs/inference_speed.md, "fp32 at batch 128"). Run over 16 images at a time, the same
operations stay in the cache. The rewrite puts every node that the classifier's flatten reads
(the feature layers, stem included) into the body of an ONNX Loop over the batch's chunks, whose
results it concatenates; the classifier then runs once on the whole batch, as before. The values
are the same: each image's features depend on that image alone (checked node by node below), so
only the floating-point order inside a kernel can differ.

Where it applies, measured on an AMD EPYC Zen 5 (docs/inference_speed.md, "The feature layers in
chunks"): with one thread per session, as the service runs on hosts of up to 3 cores, AlexNet-ACmix
gains ~6% at batch 128 (int8 ~7%) and nothing at batch 1 to 32; with two threads per session it
loses (each of the small operations is shared between threads, and 8 chunks wake the sleeping pool
thread 8 times as often), and the plain AlexNet's convolutions lose with any thread count (they
reuse their data and gain from large batches). So create_session applies it to sessions of one
thread, on graphs with attention (a Softmax) among their feature layers; others run as written.

Weights the feature layers alone read move into the loop's body, where ONNX Runtime's layout
optimizer (NCHWc) treats them as constants; left in the outer graph, its convolutions ran unblocked
and the whole model 20% slower. The file on disk, which TensorRT builds from, is unchanged.
"""

from __future__ import annotations

import numpy as np

from runtime.onnx_graph import attributes, index

CHUNK = 16

# Operations that compute each image from that image alone, given the checks in per_image.
PER_IMAGE_OPS = {"Conv", "Relu", "MaxPool", "AveragePool", "Add", "Sub", "Mul", "Div", "MatMul", "Softmax",
                 "Reshape", "Transpose", "QuantizeLinear", "DequantizeLinear", "Identity"}


def flatten_input(graph, initializers: dict) -> str | None:
    """The tensor the classifier flattens: the input of the first Flatten, or of the first Reshape to
    a constant 2-D shape; None where there is neither."""
    for node in graph.node:
        if node.op_type == "Flatten":
            return node.input[0]
        shape = initializers.get(node.input[1]) if node.op_type == "Reshape" else None
        if shape is not None and shape.ndim == 1 and shape.size == 2:
            return node.input[0]
    return None


def per_image(node, initializers: dict, ranks: dict) -> bool:
    """Whether `node`, which reads the image through its first inputs, computes each image from that
    image alone: an operation of PER_IMAGE_OPS that keeps the batch axis first (reshapes copy it,
    transposes keep it, softmax and per-axis quantization do not run along it) and whose constant
    operands broadcast over it."""
    if node.op_type not in PER_IMAGE_OPS:
        return False
    attrs = attributes(node)
    if node.op_type == "Reshape":
        shape = initializers.get(node.input[1])
        return shape is not None and shape.size > 0 and int(shape[0]) in (0, -1) and (
            int(shape[0]) == 0 or -1 not in shape[1:].tolist())
    if node.op_type == "Transpose":
        return list(attrs.get("perm", [])[:1]) == [0]
    if node.op_type == "Softmax" or node.op_type.endswith("QuantizeLinear"):
        rank = ranks.get(node.output[0])
        axis = attrs.get("axis", -1 if node.op_type == "Softmax" else 1)
        return rank is not None and axis % rank != 0
    if node.op_type in ("Add", "Sub", "Mul", "Div", "MatMul"):
        rank = ranks.get(node.output[0])
        for name in node.input:
            value = initializers.get(name)
            if value is not None and rank is not None and value.ndim == rank and value.shape[0] != 1:
                return False  # a constant with its own batch axis
        return rank is not None
    return True


def in_batch_chunks(data: bytes, chunk: int = CHUNK) -> bytes | None:
    """The serialized graph `data` with its feature layers run over the batch in chunks of `chunk`
    images (module docstring); None where it has no attention among them or they are not computed
    image by image (then it runs as written)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.ModelProto.FromString(data)
    graph = model.graph
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if len(graph.input) != 1 or opset < 13:  # 13: the Slice, Loop and Softmax written and checked here
        return None
    image = graph.input[0].name
    initializers = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    initializers.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node
                         if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})
    end = flatten_input(graph, initializers)
    if end is None or end == image:
        return None
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type for v in [*inferred.graph.value_info, *inferred.graph.input]}
    ranks = {name: len(t.shape.dim) for name, t in types.items() if t.HasField("shape")}

    producer, _ = index(graph)
    ancestors, stack = set(), [end]
    while stack:  # the nodes `end` is computed from
        node = producer.get(stack.pop())
        if node is not None and id(node) not in ancestors:
            ancestors.add(id(node))
            stack.extend(node.input)
    from_image = {image}
    section = []
    for node in graph.node:  # topological order
        if id(node) not in ancestors:
            continue
        if any(name in from_image for name in node.input):
            if not per_image(node, initializers, ranks):
                return None
            from_image.update(node.output)
        section.append(node)
    if end not in from_image or not any(node.op_type == "Softmax" for node in section):
        return None
    end_type = types.get(end)
    if end_type is None or ranks.get(end, 0) < 2:
        return None
    end_dims = [d.dim_value if d.HasField("dim_value") else None for d in end_type.shape.dim][1:]
    if None in end_dims or 0 in end_dims:
        return None  # the accumulator below needs the features' shape

    section_ids = {id(node) for node in section}
    outside = [node for node in graph.node if id(node) not in section_ids]
    read_outside = {name for node in outside for name in node.input} | {o.name for o in graph.output}
    if any(name in read_outside for node in section for name in node.output if name != end):
        return None  # a feature layer's tensor that something else reads too
    own_weights = [i for i in graph.initializer if i.name not in read_outside
                   and any(i.name in node.input for node in section)]

    piece, features = f"{image}/chunk", f"{end}/chunk"
    body_nodes = [
        helper.make_node("Constant", [], ["chunk/one"], value=numpy_helper.from_array(np.array([1], np.int64))),
        helper.make_node("Constant", [], ["chunk/axis"], value=numpy_helper.from_array(np.array([0], np.int64))),
        helper.make_node("Mul", ["chunk/index", "chunk/size"], ["chunk/first"]),  # chunk/size: the outer graph's
        helper.make_node("Add", ["chunk/first", "chunk/size"], ["chunk/past"]),
        helper.make_node("Reshape", ["chunk/first", "chunk/one"], ["chunk/starts"]),
        helper.make_node("Reshape", ["chunk/past", "chunk/one"], ["chunk/ends"]),  # Slice clamps to the batch
        helper.make_node("Slice", [image, "chunk/starts", "chunk/ends", "chunk/axis"], [piece]),
    ]
    for node in section:
        renamed = onnx.NodeProto()
        renamed.CopyFrom(node)
        for i, name in enumerate(renamed.input):
            renamed.input[i] = {image: piece, end: features}.get(name, name)
        for i, name in enumerate(renamed.output):
            renamed.output[i] = features if name == end else name
        body_nodes.append(renamed)
    body_nodes += [helper.make_node("Concat", ["chunk/done", features], ["chunk/done_out"], axis=0),
                   helper.make_node("Identity", ["chunk/go"], ["chunk/go_out"])]
    image_dims = [d.dim_value if d.HasField("dim_value") else d.dim_param or None
                  for d in graph.input[0].type.tensor_type.shape.dim][1:]
    body = helper.make_graph(
        body_nodes, "feature_layers_per_chunk",
        [helper.make_tensor_value_info("chunk/index", TensorProto.INT64, []),
         helper.make_tensor_value_info("chunk/go", TensorProto.BOOL, []),
         helper.make_tensor_value_info("chunk/done", end_type.elem_type, ["done", *end_dims])],
        [helper.make_tensor_value_info("chunk/go_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("chunk/done_out", end_type.elem_type, ["done", *end_dims])],
        own_weights,
        # The chunk's shape lets ONNX Runtime infer the body's and fuse as in the outer graph (the NCHWc
        # adds into their convolutions); without it, it adds reshapes around each add.
        value_info=[helper.make_tensor_value_info(piece, graph.input[0].type.tensor_type.elem_type,
                                                  ["chunk", *image_dims])])
    empty = numpy_helper.from_array(np.zeros([0, *end_dims], helper.tensor_dtype_to_np_dtype(end_type.elem_type)),
                                    "chunk/none")
    loop = [
        helper.make_node("Shape", [image], ["chunk/shape"]),
        helper.make_node("Constant", [], ["chunk/batch_axis"], value=numpy_helper.from_array(np.array(0, np.int64))),
        helper.make_node("Gather", ["chunk/shape", "chunk/batch_axis"], ["chunk/batch"]),
        helper.make_node("Constant", [], ["chunk/size_less_one"], value=numpy_helper.from_array(np.array(chunk - 1, np.int64))),
        helper.make_node("Constant", [], ["chunk/size"], value=numpy_helper.from_array(np.array(chunk, np.int64))),
        helper.make_node("Add", ["chunk/batch", "chunk/size_less_one"], ["chunk/batch_up"]),
        helper.make_node("Div", ["chunk/batch_up", "chunk/size"], ["chunk/count"]),
        helper.make_node("Constant", [], ["chunk/true"], value=numpy_helper.from_array(np.array(True))),
        helper.make_node("Loop", ["chunk/count", "chunk/true", "chunk/none"], [end], name="feature_layers_in_chunks",
                         body=body),
    ]
    kept = [i for i in graph.initializer if i not in own_weights]
    del graph.initializer[:]
    graph.initializer.extend([*kept, empty])
    del graph.node[:]
    graph.node.extend(loop + outside)
    return model.SerializeToString()
