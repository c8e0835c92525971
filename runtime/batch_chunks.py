"""The feature layers over the batch in chunks of CHUNK images (in_batch_chunks), for ONNX Runtime
sessions of one thread on the CPU, rewritten in memory.

At batch 128, each of the ACmix layers' small operations (attention products, softmax, transposes,
adds, conversions out of ONNX Runtime's blocked layout) reads and writes a whole tensor of ~5 MB,
more than a core's L2 cache, and so waits on the shared cache and memory, which a second session
takes too (docs/inference_speed.md, "fp32 at batch 128"). Run over 16 images at a time, the same
operations stay in the cache. The rewrite puts every node that the classifier's flatten reads
(the feature layers, stem included) into the body of an ONNX Loop over the batch's chunks, whose
results it concatenates; the classifier then runs once on the whole batch, as before. The values
are the same: before it rewrites, `per_image` checks every node that reads the image, directly or
through others, for computing each image from that image alone (the batch stays the first axis of
every such tensor, and nothing reduces or mixes along it), so only the floating-point order inside
a kernel could differ (on the exported files none does). A batch of 0 images gives 0 rows of logits
without running the feature layers.

Where it applies, measured on an AMD EPYC Zen 5 (docs/inference_speed.md, "The feature layers in
chunks"): with one thread per session, as the service runs on 2 cores (2 processes of 1 thread),
AlexNet-ACmix gains ~5% at batch 128 (int8 ~6%) and about nothing at batch 1 to 32; with two
threads per session it loses (each of the small operations is shared between threads, and 8
chunks wake the sleeping pool thread 8 times as often), and so do the plain AlexNet's convolutions
with one thread (they reuse their data and gain from large batches). So create_session applies it
to sessions of one thread, on graphs with attention (a Softmax) among their feature layers; others
run as written.

Weights the feature layers alone read move into the loop's body, where ONNX Runtime's layout
optimizer (NCHWc) treats them as constants; left in the outer graph, its convolutions ran unblocked
and the whole model 20% slower. The file on disk, which TensorRT builds from, is unchanged.
"""

from __future__ import annotations

import math

import numpy as np

from runtime.onnx_graph import attributes, index, initializer_arrays, permutation

CHUNK = 16

# Operations that can compute each image from that image alone; per_image checks how each is used.
PER_IMAGE_OPS = {"Conv", "Relu", "MaxPool", "AveragePool", "Add", "Sub", "Mul", "Div", "MatMul", "Softmax",
                 "Reshape", "Transpose", "QuantizeLinear", "DequantizeLinear", "Identity"}
ELEMENTWISE = {"Add", "Sub", "Mul", "Div"}


def constants_of(graph) -> dict[str, np.ndarray]:
    """Initializers and Constant nodes' values, by name."""
    from onnx import numpy_helper

    values = initializer_arrays(graph)
    values.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node
                   if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})
    return values


def feeds_a_product(name: str, readers: dict) -> bool:
    """Whether a MatMul or Gemm reads `name`, directly or through quantization and Identity nodes."""
    pending = [name]
    while pending:
        for reader in readers.get(pending.pop(), []):
            if reader.op_type in ("MatMul", "Gemm"):
                return True
            if reader.op_type in ("QuantizeLinear", "DequantizeLinear", "Identity"):
                pending.append(reader.output[0])
    return False


def classifier_input(graph, constants: dict, readers: dict) -> str | None:
    """The tensor the classifier flattens: the input of the first Flatten, or Reshape to a constant
    2-D shape, whose output feeds a MatMul or Gemm; None where there is none."""
    for node in graph.node:
        flattens = node.op_type == "Flatten" or (
            node.op_type == "Reshape" and constants.get(node.input[1]) is not None
            and constants[node.input[1]].shape == (2,))
        if flattens and feeds_a_product(node.output[0], readers):
            return node.input[0]
    return None


def subgraphs(node) -> list:
    """The graphs among `node`'s attributes (an If's branches, a Loop's or Scan's body)."""
    return [a.g for a in node.attribute if a.HasField("g")] + [g for a in node.attribute for g in a.graphs]


def subgraph_reads(nodes) -> set[str]:
    """The names that the subgraphs of `nodes`, at any depth, read."""
    names, graphs = set(), [g for node in nodes for g in subgraphs(node)]
    while graphs:
        for node in graphs.pop().node:
            names.update(node.input)
            graphs += subgraphs(node)
    return names


def per_image(node, from_image: set, constants: dict, shapes: dict) -> bool:
    """Whether `node`, which reads the image (directly or through the nodes before it: `from_image`),
    computes each image from that image alone, with the batch still the first axis of its output.
    `shapes`: the inferred shape of each tensor (ints, None where unknown), batch axis included."""
    out = shapes.get(node.output[0])
    if node.op_type not in PER_IMAGE_OPS or out is None:
        return False
    if node.op_type in ELEMENTWISE or node.op_type == "MatMul":
        for position, name in enumerate(node.input):
            shape = shapes.get(name)
            if shape is None:
                return False
            if name in from_image:  # batch first, and broadcasting must not move it
                if len(shape) != len(out) or (node.op_type == "MatMul" and position == 1 and len(shape) < 3):
                    return False  # (a 2-D right-hand side would sum over the batch)
            elif len(shape) == len(out) and shape[0] != 1:
                return False  # an operand with its own batch axis
        return True
    data = node.input[0]
    if data not in from_image or any(name in from_image for name in node.input[1:]):
        return False  # the image arrives as the data; weights, shapes and scales are not computed from it
    if node.op_type == "Reshape":
        target, before = constants.get(node.input[1]), shapes.get(data)
        if target is None or target.ndim != 1 or target.size == 0 or attributes(node).get("allowzero", 0):
            return False
        first, rest = int(target[0]), [int(d) for d in target[1:]]
        if first == 0:
            return True
        # -1 first keeps the batch only if the other dimensions hold exactly one image
        return (first == -1 and before is not None and None not in before[1:] and -1 not in rest and 0 not in rest
                and math.prod(rest) == math.prod(before[1:]))
    if node.op_type == "Transpose":
        return permutation(node)[:1] == [0]
    if node.op_type == "Softmax" or node.op_type.endswith("QuantizeLinear"):
        axis = attributes(node).get("axis", -1 if node.op_type == "Softmax" else 1)
        return axis % len(out) != 0
    return len(shapes.get(data) or []) == len(out)  # Conv, pooling, Relu, Identity: batch in, batch out


def fresh_prefix(model) -> str:
    """A prefix for the rewrite's names that no name of the graph, or of its subgraphs, starts with."""
    names = {v.name for v in [*model.graph.input, *model.graph.output, *model.graph.value_info, *model.graph.initializer]}
    for node in model.graph.node:
        names.update([*node.input, *node.output])
    names |= subgraph_reads(model.graph.node)
    prefix, number = "batch_chunks/", 0
    while any(name.startswith(prefix) for name in names):
        number += 1
        prefix = f"batch_chunks{number}/"
    return prefix


def in_batch_chunks(data: bytes, chunk: int = CHUNK) -> bytes | None:
    """The serialized graph `data` with its feature layers run over the batch in chunks of `chunk`
    images (module docstring); None where it runs as written: no attention among the feature layers,
    a node that is not per_image, features read by anything but the classifier, features of unknown
    shape, more than one graph input, or an opset before 13."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.ModelProto.FromString(data)
    graph = model.graph
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if len(graph.input) != 1 or opset < 13:  # 13: the Slice, Loop and Softmax written and checked here
        return None
    image = graph.input[0].name
    constants = constants_of(graph)
    producer, readers = index(graph)
    end = classifier_input(graph, constants, readers)
    if end is None or end == image:
        return None
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type for v in [*inferred.graph.value_info, *inferred.graph.input]}
    shapes = {name: [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
              for name, t in types.items() if t.HasField("shape")}
    shapes.update({name: list(value.shape) for name, value in constants.items()})

    ancestors, stack = set(), [end]
    while stack:  # the nodes `end` is computed from
        node = producer.get(stack.pop())
        if node is not None and id(node) not in ancestors:
            ancestors.add(id(node))
            stack.extend(node.input)
    from_image, section = {image}, []
    for node in graph.node:  # topological order
        if id(node) not in ancestors:
            continue
        if any(name in from_image for name in node.input):
            if not per_image(node, from_image, constants, shapes):
                return None
            from_image.update(node.output)
        section.append(node)
    if end not in from_image or not any(node.op_type == "Softmax" for node in section):
        return None
    end_dims = shapes.get(end, [None])[1:]
    if not end_dims or None in end_dims or 0 in end_dims:
        return None  # the loop's first, empty result needs the features' shape

    section_ids = {id(node) for node in section}
    outside = [node for node in graph.node if id(node) not in section_ids]
    read_outside = ({name for node in outside for name in node.input} | subgraph_reads(outside)
                    | {o.name for o in graph.output})
    if any(name in read_outside for node in section for name in node.output if name != end):
        return None  # a feature layer's tensor that something else reads too
    in_section = {name for node in section for name in node.input}
    own_weights = {i.name for i in graph.initializer if i.name in in_section and i.name not in read_outside}

    p = fresh_prefix(model)
    piece, features = f"{p}image", f"{p}features"
    body_nodes = [
        helper.make_node("Constant", [], [f"{p}one"], value=numpy_helper.from_array(np.array([1], np.int64))),
        helper.make_node("Constant", [], [f"{p}axis"], value=numpy_helper.from_array(np.array([0], np.int64))),
        helper.make_node("Mul", [f"{p}index", f"{p}size"], [f"{p}first"]),  # size: the outer graph's
        helper.make_node("Add", [f"{p}first", f"{p}size"], [f"{p}past"]),
        helper.make_node("Reshape", [f"{p}first", f"{p}one"], [f"{p}starts"]),
        helper.make_node("Reshape", [f"{p}past", f"{p}one"], [f"{p}ends"]),  # Slice clamps to the batch
        helper.make_node("Slice", [image, f"{p}starts", f"{p}ends", f"{p}axis"], [piece]),
    ]
    for node in section:
        renamed = onnx.NodeProto()
        renamed.CopyFrom(node)
        for i, name in enumerate(renamed.input):
            renamed.input[i] = {image: piece, end: features}.get(name, name)
        for i, name in enumerate(renamed.output):
            renamed.output[i] = features if name == end else name
        body_nodes.append(renamed)
    body_nodes += [helper.make_node("Concat", [f"{p}done", features], [f"{p}done_out"], axis=0),
                   helper.make_node("Identity", [f"{p}go"], [f"{p}go_out"])]
    elem_type = types[end].elem_type
    image_dims = [d.dim_value if d.HasField("dim_value") else d.dim_param or None
                  for d in graph.input[0].type.tensor_type.shape.dim][1:]
    body = helper.make_graph(
        body_nodes, "feature_layers_per_chunk",
        [helper.make_tensor_value_info(f"{p}index", TensorProto.INT64, []),
         helper.make_tensor_value_info(f"{p}go", TensorProto.BOOL, []),
         helper.make_tensor_value_info(f"{p}done", elem_type, ["done", *end_dims])],
        [helper.make_tensor_value_info(f"{p}go_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info(f"{p}done_out", elem_type, ["done", *end_dims])],
        [i for i in graph.initializer if i.name in own_weights],
        # The chunk's shape lets ONNX Runtime infer the body's and fuse as in the outer graph (the NCHWc
        # adds into their convolutions); without it, it adds reshapes around each add.
        value_info=[helper.make_tensor_value_info(piece, graph.input[0].type.tensor_type.elem_type,
                                                  ["chunk", *image_dims])])
    none = numpy_helper.from_array(np.zeros([0, *end_dims], helper.tensor_dtype_to_np_dtype(elem_type)), f"{p}none")
    loop = [
        helper.make_node("Shape", [image], [f"{p}shape"]),
        helper.make_node("Constant", [], [f"{p}batch_axis"], value=numpy_helper.from_array(np.array(0, np.int64))),
        helper.make_node("Gather", [f"{p}shape", f"{p}batch_axis"], [f"{p}batch"]),
        helper.make_node("Constant", [], [f"{p}size_less_one"], value=numpy_helper.from_array(np.array(chunk - 1, np.int64))),
        helper.make_node("Constant", [], [f"{p}size"], value=numpy_helper.from_array(np.array(chunk, np.int64))),
        helper.make_node("Add", [f"{p}batch", f"{p}size_less_one"], [f"{p}batch_up"]),
        helper.make_node("Div", [f"{p}batch_up", f"{p}size"], [f"{p}count"]),
        helper.make_node("Constant", [], [f"{p}true"], value=numpy_helper.from_array(np.array(True))),
        helper.make_node("Loop", [f"{p}count", f"{p}true", f"{p}none"], [end], name=f"{p}feature_layers", body=body),
    ]
    kept = [i for i in graph.initializer if i.name not in own_weights]
    del graph.initializer[:]
    graph.initializer.extend([*kept, none])
    del graph.node[:]
    graph.node.extend(loop + outside)
    return model.SerializeToString()
