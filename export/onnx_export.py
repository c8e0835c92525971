"""Paddle weights -> ONNX: paddle.jit.save, paddle2onnx, then onnxslim.

The exported graph has one input `image` float32 [batch, 3, 128, 128] and one output `logits`
float32 [batch, 10]; everything but the batch is static and every constant is an initializer.
Subnormal initializer values are set to zero (model/subnormals.py). The file records the sha256
of its weights and the calibration temperature shipped beside them (runtime/artifacts.py,
model/calibration.py), and is written whole, with the reference images and their
Paddle logits beside it (export/reference.py).
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from export.errors import ExportError
from model.calibration import read_temperature
from model.files import missing, replacing
from model.spec import INPUT_NAME, INPUT_SHAPE, OUTPUT_NAME
from model.subnormals import count_subnormals, flush_subnormals
from runtime.artifacts import TEMPERATURE, WEIGHTS_DIGEST, sha256_file

BATCH_DIM = "batch"
OPSET = 17
# Ops whose shape-like operands TensorRT's ONNX parser needs as initializers, not tensors.
STATIC_OPERANDS = {"Pad": [1], "Slice": [1, 2, 3, 4], "Squeeze": [1], "Unsqueeze": [1], "ReduceSum": [1],
                   "Reshape": [1]}


def export_onnx(weights: str | Path, out: str | Path, arch: str = "alexnet_acmix", data: str | Path | None = None,
                split_file: str | None = None, check=None) -> Path:
    """Write the ONNX model of `arch` with `weights` to `out`, and its reference images (validation
    images of `data`, else generated ones) beside it; returns the path. `check(path)`, where given,
    runs on the written file before it replaces `out`: an error there leaves `out` as it was."""
    import onnx
    import onnxslim

    from export.reference import write_reference
    from model.predict import load_weights
    from model.runtime import import_paddle

    weights, out = Path(weights), Path(out)
    if why := missing(weights, "weights file"):
        raise ExportError(why)
    with tqdm(total=5, desc="export onnx", unit="step") as steps:
        paddle = import_paddle()
        try:
            model = load_weights(arch, str(weights))
        except ValueError as exc:
            raise ExportError(str(exc)) from None
        with tempfile.TemporaryDirectory() as tmp:
            steps.set_postfix_str("paddle.jit.save")
            prefix = str(Path(tmp) / arch)
            spec = [paddle.static.InputSpec([None, *INPUT_SHAPE], "float32", INPUT_NAME)]
            paddle.jit.save(model, prefix, input_spec=spec)
            steps.update()
            steps.set_postfix_str("paddle2onnx")
            raw = Path(tmp) / "raw.onnx"
            _paddle2onnx(prefix, raw)
            steps.update()
            steps.set_postfix_str("onnxslim")
            graph = onnxslim.slim(onnx.load(str(raw)))
            steps.update()
        graph = name_io(graph)
        flush_subnormal_initializers(graph)
        graph.metadata_props.add(key=WEIGHTS_DIGEST, value=sha256_file(weights))
        temperature = read_temperature(weights.parent)
        if temperature is not None:
            graph.metadata_props.add(key=TEMPERATURE, value=repr(temperature))
        onnx.checker.check_model(graph, full_check=True)
        with replacing(out) as tmp:
            onnx.save(graph, tmp)
            if check is not None:
                steps.set_postfix_str("check")
                check(Path(tmp))
            steps.update()
            # The reference logits after the check (one that fails leaves the ONNX of before with its
            # own reference), and before the ONNX is renamed into place: an export stopped between the
            # two leaves an ONNX of before (made again: another weights digest) or none, never a new
            # ONNX without its reference.
            steps.set_postfix_str("reference logits")
            write_reference(out, model, data, split_file)
        steps.update()
    return out


def flush_subnormal_initializers(model) -> int:
    """Set subnormal values of float initializers to zero, in place; returns how many there were."""
    from onnx import numpy_helper

    flushed = 0
    for init in model.graph.initializer:
        array = numpy_helper.to_array(init)
        clean = flush_subnormals(array)
        if clean is not array:
            flushed += count_subnormals(array)
            init.CopyFrom(numpy_helper.from_array(clean, init.name))
    return flushed


def _paddle2onnx(prefix: str, out: Path) -> None:
    import contextlib
    import io

    import paddle2onnx

    model_file = prefix + ".json" if Path(prefix + ".json").exists() else prefix + ".pdmodel"
    # paddle2onnx prints its own progress lines; keep them out of ours.
    with contextlib.redirect_stdout(io.StringIO()):
        paddle2onnx.export(
            model_file,
            prefix + ".pdiparams",
            str(out),
            opset_version=OPSET,
            auto_upgrade_opset=False,
            enable_onnx_checker=True,
            enable_optimize=True,
        )


def name_io(model):
    """One input `image` and one output `logits`, with the batch dimension called `batch`."""
    graph = model.graph
    if len(graph.input) != 1 or len(graph.output) != 1:
        raise ExportError(f"expected one input and one output, found {len(graph.input)} and {len(graph.output)}")
    renames = {graph.input[0].name: INPUT_NAME, graph.output[0].name: OUTPUT_NAME}
    for node in graph.node:
        node.input[:] = [renames.get(name, name) for name in node.input]
        node.output[:] = [renames.get(name, name) for name in node.output]
    graph.input[0].name, graph.output[0].name = INPUT_NAME, OUTPUT_NAME
    for value in (graph.input[0], graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_param = BATCH_DIM
    return model


def graph_report(model) -> dict:
    """Properties the export promises, as data (what the tests check of every exported file)."""
    import onnx

    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    produced = {out for node in graph.node for out in node.output}
    consumed = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    dynamic_operands = [
        f"{node.op_type}:{node.input[i]}"
        for node in graph.node
        for i in STATIC_OPERANDS.get(node.op_type, [])
        if i < len(node.input) and node.input[i] and node.input[i] not in initializers
    ]

    constant = set(initializers)
    for node in graph.node:  # topological order: a node fed only by constants is one itself
        if node.op_type == "Constant" or all(name in constant for name in node.input if name):
            constant.update(node.output)

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    return {
        "ops": dict(Counter(node.op_type for node in graph.node)),
        "inputs": {v.name: (onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type), dims(v)) for v in graph.input},
        "outputs": {v.name: (onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type), dims(v)) for v in graph.output},
        "dead_nodes": [n.name for n in graph.node if not set(n.output) & consumed],
        "unused_initializers": sorted(initializers - consumed),
        "dynamic_shape_operands": dynamic_operands,
        "shape_computation": [n.name for n in graph.node if n.op_type in ("Shape", "ConstantOfShape", "Range")],
        # Work that depends on weights only and would be redone on every call, e.g. unfolded weight products.
        "constant_computation": [f"{n.op_type}:{n.name}" for n in graph.node if set(n.output) <= constant],
        "produced": len(produced),
    }
