"""ONNX Runtime: the one session factory, and the backend over it.

Every session the project creates (the service, export verification, every benchmark) comes from
`create_session`, so that what is measured is what is served:

* denormals as zero (`session.set_denormal_as_zero`): subnormal activations cost ~100x per
  product on some CPUs (../shared/notes/subnormals.md); the export flushes subnormal weights too.
  That option covers ONNX Runtime's pool threads only, so each `run` of a session made here sets the
  same mode in the calling thread for its duration (runtime/cpu.py);
* idle intra-op threads sleep instead of spinning (`session.intra_op.allow_spinning` 0): spinning
  takes the cores that HTTP handling and image decoding share with inference; a sleeping pool
  costs a little latency per batch only;
* `threads` intra-op threads per session (default: ONNX Runtime's, one per core), one inter-op.

An int8 QDQ file (export/int8.py) quantizes activations as int8 with zero point 0, because
TensorRT's explicit quantization requires it. ONNX Runtime's x86 CPU kernels want unsigned
activations: on the CPU, `create_session` loads such a file with every activation Q/DQ pair
rewritten to uint8 with zero point 128, which denotes exactly the same values (q + 128, same
scale; weights stay int8): on an Intel Xeon, int8 went from 0.69-0.85x fp32 to 1.01-1.58x
(`python -m benchmarks.onnx_runtime`, README "INT8"). Where a quantized tensor is a ReLU's output
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

from model.spec import INPUT_NAME, OUTPUT_NAME
from runtime.backend import Backend, BackendError
from runtime.cpu import denormals_as_zero, int8_pairs_saturate

SESSION_CONFIG = {
    "session.set_denormal_as_zero": "1",
    "session.intra_op.allow_spinning": "0",
}


def session_options(threads: int | None = None):
    """The SessionOptions every session of the project uses."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    for key, value in SESSION_CONFIG.items():
        options.add_session_config_entry(key, value)
    return options


def unsigned_activations(model) -> int:
    """Rewrite, in place, the activation QuantizeLinear/DequantizeLinear nodes of an ONNX `model`
    whose zero point is a scalar int8 0 to a uint8 zero point of 128; returns how many changed.

    Activation nodes are every QuantizeLinear and the DequantizeLinear nodes fed by one; weight and
    bias DequantizeLinear nodes read initializers and keep their int8/int32 values.
    """
    from onnx import TensorProto, numpy_helper

    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    quantized = {node.output[0] for node in graph.node if node.op_type == "QuantizeLinear"}
    added: dict[str, str] = {}
    changed = 0
    for node in graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 3:
            continue
        if node.op_type == "DequantizeLinear" and node.input[0] not in quantized:
            continue
        zero_point = initializers.get(node.input[2])
        if zero_point is None or zero_point.data_type != TensorProto.INT8:
            continue
        value = numpy_helper.to_array(zero_point)
        if value.size != 1 or int(value.reshape(-1)[0]) != 0:
            continue
        if zero_point.name not in added:
            name = f"{zero_point.name}_as_uint8"
            graph.initializer.append(numpy_helper.from_array(np.full(value.shape, 128, np.uint8), name))
            added[zero_point.name] = name
        node.input[2] = added[zero_point.name]
        changed += 1
    used = {name for node in graph.node for name in node.input}
    unused = [init for init in graph.initializer if init.name in added and init.name not in used]
    for init in unused:
        graph.initializer.remove(init)
    return changed


# Ops that keep a tensor non-negative: what a ReLU's output passes through before it is quantized.
_KEEP_SIGN = {"MaxPool", "Reshape", "Flatten", "Transpose"}


def relu_into_quantize(model) -> int:
    """Rewrite, in place, each Relu whose output reaches only QuantizeLinear nodes with a uint8 zero
    point of 128 (through _KEEP_SIGN ops): those nodes and the DequantizeLinear nodes of their
    outputs get zero point 0 and the Relu goes. Returns how many Relu nodes went. Run after
    unsigned_activations."""
    from onnx import TensorProto, numpy_helper

    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}

    def unsigned_128(name: str) -> bool:
        zero_point = initializers.get(name)
        if zero_point is None or zero_point.data_type != TensorProto.UINT8:
            return False
        value = numpy_helper.to_array(zero_point)
        return value.size == 1 and int(value.reshape(-1)[0]) == 128

    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    zero = "relu_output_zero_point_uint8"
    removed = 0
    for relu in [n for n in graph.node if n.op_type == "Relu"]:
        quantizers, frontier, ok = [], [relu.output[0]], relu.output[0] not in {o.name for o in graph.output}
        while frontier and ok:
            tensor = frontier.pop()
            for reader in readers.get(tensor, []):
                if (reader.op_type == "QuantizeLinear" and reader.input[0] == tensor and len(reader.input) > 2
                        and unsigned_128(reader.input[2])):
                    quantizers.append(reader)
                elif reader.op_type in _KEEP_SIGN and reader.input[0] == tensor:
                    frontier.extend(reader.output)
                else:
                    ok = False
        dequantizers = [r for q in quantizers for r in readers.get(q.output[0], [])]
        if not ok or not quantizers or any(r.op_type != "DequantizeLinear" for r in dequantizers):
            continue
        if zero not in initializers:
            initializers[zero] = numpy_helper.from_array(np.array(0, np.uint8), zero)
            graph.initializer.append(initializers[zero])
        for node in quantizers + dequantizers:
            node.input[2] = zero
        for reader in readers.get(relu.output[0], []):
            for i, name in enumerate(reader.input):
                if name == relu.output[0]:
                    reader.input[i] = relu.input[0]
        graph.node.remove(relu)
        removed += 1
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
    producers = {out: node for node in graph.node for out in node.output}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1

    def dequantized(name: str, data_type: int):
        """The DequantizeLinear producing `name` from an initializer or a tensor of `data_type`, with
        its zero point's values, or None."""
        node = producers.get(name)
        if node is None or node.op_type != "DequantizeLinear" or len(node.input) < 3:
            return None
        zero_point = initializers.get(node.input[2])
        if zero_point is None or zero_point.data_type != data_type:
            return None
        return node, numpy_helper.to_array(zero_point)

    changed = 0
    for node in graph.node:
        if node.op_type not in ("Conv", "MatMul", "Gemm") or len(node.input) < 2:
            continue
        source = dequantized(node.input[0], TensorProto.UINT8)
        weight = dequantized(node.input[1], TensorProto.INT8)
        if source is None or weight is None or not source[1].any() or weight[1].any():
            continue
        dequantize, zero_point = weight
        stored = initializers.get(dequantize.input[0])
        if stored is None or stored.data_type != TensorProto.INT8 or readers.get(stored.name) != 1:
            continue
        values = numpy_helper.to_array(stored).astype(np.int16) + 128
        stored.CopyFrom(numpy_helper.from_array(values.astype(np.uint8), stored.name))
        unsigned_zero = f"{dequantize.input[2]}_uint8"
        if unsigned_zero not in initializers:
            initializers[unsigned_zero] = numpy_helper.from_array(np.full(zero_point.shape, 128, np.uint8), unsigned_zero)
            graph.initializer.append(initializers[unsigned_zero])
        readers[dequantize.input[2]] -= 1
        if not readers[dequantize.input[2]]:
            graph.initializer.remove(initializers.pop(dequantize.input[2]))
        dequantize.input[2] = unsigned_zero
        changed += 1
    return changed


def cpu_graph(path: Path, pairs_saturate: bool | None = None) -> bytes:
    """The serialized graph ONNX Runtime's CPU provider runs for the file at `path`: its bytes, read
    once, with int8 activations made unsigned and ReLUs folded into the quantization after them,
    where it has any; where `pairs_saturate` (default: this CPU's, runtime/cpu.py), the weights that
    would saturate made unsigned too."""
    import onnx

    data = path.read_bytes()
    model = onnx.ModelProto.FromString(data)
    if not unsigned_activations(model):
        return data
    relu_into_quantize(model)
    if int8_pairs_saturate() if pairs_saturate is None else pairs_saturate:
        unsigned_weights_for_offset_inputs(model)
    return model.SerializeToString()


class Session:
    """An onnxruntime.InferenceSession whose `run` computes with denormals as zero in the calling
    thread too (module docstring); everything else is the session's own."""

    def __init__(self, session):
        self.session = session

    def run(self, *args, **kwargs):
        with denormals_as_zero():
            return self.session.run(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.session, name)


def create_session(path: str | Path, threads: int | None = None, providers: list[str] | None = None):
    """An InferenceSession over `path` with the project's options; BackendError naming the file if
    it is missing or ONNX Runtime cannot load it. providers default to CUDA where ONNX Runtime has
    it, then the CPU."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise BackendError(f"{path}: no such ONNX file")
    if providers is None:
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    try:
        graph = cpu_graph(path) if providers[:1] == ["CPUExecutionProvider"] else str(path)
        return Session(ort.InferenceSession(graph, session_options(threads), providers=providers))
    except Exception as exc:  # onnxruntime raises its own exception types
        raise BackendError(f"{path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0][:200]})") from None


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    concurrent = True  # InferenceSession.run is thread-safe

    def __init__(self, onnx_path: str | Path, max_batch: int, threads: int | None = None,
                 providers: list[str] | None = None):
        super().__init__(max_batch)
        self.onnx_path = Path(onnx_path)
        self.threads = threads
        self.providers = providers
        self.session = None

    def _load(self) -> None:
        self.session = create_session(self.onnx_path, self.threads, self.providers)
        inputs = {i.name: i.type for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        if inputs != {INPUT_NAME: "tensor(float)"} or OUTPUT_NAME not in outputs:
            self.session = None
            raise BackendError(f"{self.onnx_path}: expected input {INPUT_NAME} float and output {OUTPUT_NAME}")
        self.description = f"{self.onnx_path} on {self.session.get_providers()[0]}"

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]

    def _close(self) -> None:
        self.session = None
