"""The graph ONNX Runtime's CPU provider runs for an int8 QDQ file (cpu_graph), rewritten in memory.

The file keeps its quantized convolutions' biases float, as TensorRT's ONNX parser needs;
`int32_biases` first quantizes them to int32 exactly as the quantizer's default would have written
them into the file (as it did before session 22), so that ONNX Runtime computes what the int8
accuracy and agreement figures were measured on, to the bit. (ONNX Runtime 1.32 fuses the integer
convolution with a float bias too, with other roundings: logits up to 0.3 apart on random images.)

An int8 QDQ file (export/int8.py) quantizes activations as int8 with zero point 0, because
TensorRT's explicit quantization requires it. ONNX Runtime's x86 CPU kernels want unsigned
activations: on the CPU, `create_session` loads such a file with every activation Q/DQ pair
rewritten to uint8 with zero point 128, which denotes exactly the same values (q + 128, same
scale; weights stay int8): on an Intel Xeon, int8 went from 0.69-0.85x fp32 to 1.01-1.58x
(`python -m benchmarks.onnx_runtime`, docs/inference_speed.md, "INT8"). Where a quantized tensor is a ReLU's output
(through max pooling or reshapes), its zero point is 0 instead, and the ReLU goes: quantizing to
uint8 with zero point 0 clamps at 0, which is the ReLU, so ONNX Runtime runs the convolution, its
ReLU and the quantization as one integer kernel rather than dequantizing to float for the ReLU.
Within the calibrated range the values are the same; above it such a tensor saturates at 255
steps instead of 127. On an x86 CPU without VNNI, whose uint8 x int8 kernels add pairs of products
in 16 bits with saturation, the layers reading an input with zero point 128 (the stem) get uint8
weights too (unsigned_weights_for_offset_inputs). The file on disk, which TensorRT builds from, is
unchanged.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.cpu import int8_pairs_saturate
from runtime.onnx_graph import drop_unused_initializers, index


def zero_point(initializers: dict, name: str, data_type: int) -> np.ndarray | None:
    """The values of the zero point initializer `name` if it is one of `data_type`, else None."""
    from onnx import numpy_helper

    stored = initializers.get(name)
    return None if stored is None or stored.data_type != data_type else numpy_helper.to_array(stored)


def is_scalar(values: np.ndarray | None, value: int) -> bool:
    return values is not None and values.size == 1 and int(values.reshape(-1)[0]) == value


def add_constant(graph, initializers: dict, name: str, value: np.ndarray) -> str:
    """`name`, added to the graph as an initializer holding `value` unless it is one already."""
    from onnx import numpy_helper

    if name not in initializers:
        initializers[name] = numpy_helper.from_array(value, name)
        graph.initializer.append(initializers[name])
    return name


def unsigned_activations(model) -> int:
    """Rewrite, in place, the activation QuantizeLinear/DequantizeLinear nodes of an ONNX `model`
    whose zero point is a scalar int8 0 to a uint8 zero point of 128; returns how many changed.

    Activation nodes are every QuantizeLinear and the DequantizeLinear nodes fed by one; weight and
    bias DequantizeLinear nodes read initializers and keep their int8/int32 values.
    """
    from onnx import TensorProto

    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    producer, _ = index(graph)
    changed = 0
    for node in graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 3:
            continue
        source = producer.get(node.input[0])
        if node.op_type == "DequantizeLinear" and (source is None or source.op_type != "QuantizeLinear"):
            continue
        values = zero_point(initializers, node.input[2], TensorProto.INT8)
        if not is_scalar(values, 0):
            continue
        node.input[2] = add_constant(graph, initializers, f"{node.input[2]}_as_uint8", np.full(values.shape, 128, np.uint8))
        changed += 1
    drop_unused_initializers(graph)
    return changed


def int32_biases(model) -> int:
    """Rewrite, in place, the float bias of each Conv whose input and weight are dequantized as an
    int32 initializer dequantized with scale input scale x weight scale (per output channel) and
    zero point 0; returns how many changed. That is the bias onnxruntime.quantization writes by
    default (QuantizeBias; its quantize_bias_static_impl: the bias in float64 over that float32
    scale, rounded, clipped to int32), which the file does not have because TensorRT's ONNX parser
    needs float biases (export/int8.py). Scales are the same before and after unsigned_activations."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    producer, _ = index(graph)

    def scale(name: str) -> np.ndarray | None:
        node = producer.get(name)
        if node is None or node.op_type != "DequantizeLinear" or node.input[1] not in initializers:
            return None
        return numpy_helper.to_array(initializers[node.input[1]]).astype(np.float32)

    changed = 0
    for node in [n for n in graph.node if n.op_type == "Conv" and len(n.input) > 2 and n.input[2]]:
        bias = initializers.get(node.input[2])
        x_scale, w_scale = scale(node.input[0]), scale(node.input[1])
        if bias is None or bias.data_type != TensorProto.FLOAT or x_scale is None or w_scale is None:
            continue
        if x_scale.size != 1:
            continue
        values = numpy_helper.to_array(bias)
        bias_scale = (x_scale.reshape(()) * w_scale).astype(np.float32)
        if bias_scale.size not in (1, values.size):
            continue
        steps = (values.astype(np.float64) / bias_scale.astype(np.float64)).round()
        info = np.iinfo(np.int32)
        quantized = np.clip(steps, float(info.min), float(info.max)).astype(np.int32).reshape(values.shape)
        name = f"{bias.name}_int32"
        shape = (-1,) if bias_scale.size > 1 else ()
        add_constant(graph, initializers, name, quantized)
        add_constant(graph, initializers, f"{name}_scale", bias_scale.reshape(shape))
        add_constant(graph, initializers, f"{name}_zero_point", np.zeros(bias_scale.size, np.int32).reshape(shape))
        dequantized = f"{name}_dequantized"
        dequantize = helper.make_node("DequantizeLinear", [name, f"{name}_scale", f"{name}_zero_point"],
                                      [dequantized], name=f"{name}_DequantizeLinear",
                                      **({"axis": 0} if bias_scale.size > 1 else {}))
        graph.node.insert(list(graph.node).index(node), dequantize)
        node.input[2] = dequantized
        changed += 1
    drop_unused_initializers(graph)
    return changed


# Ops that keep a tensor non-negative: what a ReLU's output passes through before it is quantized.
_KEEP_SIGN = {"MaxPool", "Reshape", "Flatten", "Transpose"}


def relu_into_quantize(model) -> int:
    """Rewrite, in place, each Relu whose output reaches only QuantizeLinear nodes with a uint8 zero
    point of 128 (through _KEEP_SIGN ops): those nodes and the DequantizeLinear nodes of their
    outputs get zero point 0 and the Relu goes. Returns how many Relu nodes went. Run after
    unsigned_activations."""
    from onnx import TensorProto

    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    _, readers = index(graph)
    outputs = {o.name for o in graph.output}
    removed = 0
    for relu in [n for n in graph.node if n.op_type == "Relu"]:
        quantizers, frontier, ok = [], [relu.output[0]], relu.output[0] not in outputs
        while frontier and ok:
            tensor = frontier.pop()
            for reader in readers.get(tensor, []):
                if (reader.op_type == "QuantizeLinear" and reader.input[0] == tensor and len(reader.input) > 2
                        and is_scalar(zero_point(initializers, reader.input[2], TensorProto.UINT8), 128)):
                    quantizers.append(reader)
                elif reader.op_type in _KEEP_SIGN and reader.input[0] == tensor:
                    frontier.extend(reader.output)
                else:
                    ok = False
        dequantizers = [r for q in quantizers for r in readers.get(q.output[0], [])]
        if not ok or not quantizers or any(r.op_type != "DequantizeLinear" for r in dequantizers):
            continue
        zero = add_constant(graph, initializers, "relu_output_zero_point_uint8", np.array(0, np.uint8))
        for node in quantizers + dequantizers:
            node.input[2] = zero
        for reader in readers.get(relu.output[0], []):
            for i, name in enumerate(reader.input):
                if name == relu.output[0]:
                    reader.input[i] = relu.input[0]
        graph.node.remove(relu)
        removed += 1
    drop_unused_initializers(graph)
    return removed


def unsigned_weights_for_offset_inputs(model) -> int:
    """Rewrite, in place, the int8 weights (zero point 0) of each Conv, MatMul or Gemm whose input is
    dequantized from uint8 with a nonzero zero point to uint8 with zero point 128 (w + 128: the same
    values); returns how many layers changed. Run after relu_into_quantize.

    For CPUs where ONNX Runtime's uint8 x int8 kernels saturate (runtime/cpu.py,
    int8_pairs_saturate). Such an input's bytes sit around its zero point of 128, so a pair of
    products with two large weights of one sign passes 32767: the stem's does (the image is
    quantized symmetrically): emulated (benchmarks/int8_avx2_emulation.py, the weights shipped in
    session 11), 0.23% of its pair sums saturate on 16 validation images and 2.5% of top-1 answers
    change on 1,000; the reference check at start passes by 0.05 (it failed, 1.83 against a
    tolerance of 1.0, on the weights of session 10). With uint8 weights ONNX Runtime runs the layer with its
    uint8 x uint8 kernels, which widen to 16 bits before multiplying and do not saturate. The
    inputs after a ReLU (zero point 0, bytes mostly small) saturated in no pair, emulated on real
    images, and keep the faster kernels."""
    from onnx import TensorProto, numpy_helper

    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    producer, readers = index(graph)

    def dequantized(name: str, data_type: int):
        """The DequantizeLinear producing `name` with a zero point of `data_type`, and that zero
        point's values, or None."""
        node = producer.get(name)
        if node is None or node.op_type != "DequantizeLinear" or len(node.input) < 3:
            return None
        values = zero_point(initializers, node.input[2], data_type)
        return None if values is None else (node, values)

    changed = 0
    for node in graph.node:
        if node.op_type not in ("Conv", "MatMul", "Gemm") or len(node.input) < 2:
            continue
        source = dequantized(node.input[0], TensorProto.UINT8)
        weight = dequantized(node.input[1], TensorProto.INT8)
        if source is None or weight is None or not source[1].any() or weight[1].any():
            continue
        dequantize, values = weight
        stored = initializers.get(dequantize.input[0])
        if stored is None or stored.data_type != TensorProto.INT8 or len(readers[stored.name]) != 1:
            continue
        unsigned = numpy_helper.to_array(stored).astype(np.int16) + 128
        stored.CopyFrom(numpy_helper.from_array(unsigned.astype(np.uint8), stored.name))
        dequantize.input[2] = add_constant(graph, initializers, f"{dequantize.input[2]}_uint8",
                                           np.full(values.shape, 128, np.uint8))
        changed += 1
    drop_unused_initializers(graph)
    return changed


def cpu_graph(path: Path, pairs_saturate: bool | None = None) -> bytes:
    """The serialized graph ONNX Runtime's CPU provider runs for the file at `path`: its bytes, read
    once, with the quantized convolutions' biases int32, int8 activations made unsigned and ReLUs
    folded into the quantization after them, where it has any; where `pairs_saturate` (default: this
    CPU's, runtime/cpu.py), the weights that would saturate made unsigned too."""
    import onnx

    data = path.read_bytes()
    model = onnx.ModelProto.FromString(data)
    biases = int32_biases(model)
    if not unsigned_activations(model) and not biases:
        return data
    relu_into_quantize(model)
    if int8_pairs_saturate() if pairs_saturate is None else pairs_saturate:
        unsigned_weights_for_offset_inputs(model)
    return model.SerializeToString()
