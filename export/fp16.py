"""fp32 ONNX -> fp16 ONNX, the only way to an fp16 engine in TensorRT 11 (no FP16 builder flag).

Weights and activations become float16 for a strongly typed build; the input `image` and the
output `logits` stay float32 (Cast nodes at the edges), so every backend feeds and reads the same
arrays. The converter clamps weights to +-1e4 by default, which keeps the attention mask of -1e4
exactly and leaves headroom below fp16's largest finite value, 65504. The file records the sha256
of the fp32 ONNX it came from (runtime/artifacts.py) and is written whole.
"""

from __future__ import annotations

from pathlib import Path

from export.errors import ExportError
from model.files import replacing
from runtime.artifacts import SOURCE_DIGEST, sha256_file


def convert_fp16(onnx_in: str | Path, onnx_out: str | Path) -> Path:
    """Write the fp16 version of `onnx_in` (float32 inputs and outputs) to `onnx_out`; returns the path."""
    import onnx
    from onnxconverter_common import float16

    onnx_in, onnx_out = Path(onnx_in), Path(onnx_out)
    model = read_fp32_source(onnx_in)
    name_nodes(model.graph)
    try:
        model = float16.convert_float_to_float16(model, keep_io_types=True)
    except ValueError as exc:  # e.g. a model that is float16 already
        raise ExportError(f"{onnx_in}: cannot convert to fp16 ({str(exc).splitlines()[0]})") from None
    check_finite(model)
    set_source(model, onnx_in)
    onnx.checker.check_model(model, full_check=True)
    with replacing(onnx_out) as tmp:
        onnx.save(model, tmp)
    return onnx_out


def read_fp32_source(path: Path):
    """The fp32 ONNX an fp16 or int8 file is made from; ExportError naming it where it is missing,
    not ONNX, or itself made from another (its metadata names a source)."""
    from runtime.onnx_graph import read_onnx

    try:
        model = read_onnx(path)
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    if any(prop.key == SOURCE_DIGEST for prop in model.metadata_props):
        raise ExportError(f"{path}: an fp16 or int8 ONNX, made from another; give the fp32 ONNX (--from-onnx)")
    return model


def set_source(model, source: Path) -> None:
    """Record the sha256 of the fp32 ONNX a derived (fp16, int8) ONNX was made from, replacing any
    digest copied from the source's own metadata."""
    kept = [prop for prop in model.metadata_props if prop.key != SOURCE_DIGEST]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key=SOURCE_DIGEST, value=sha256_file(source))


def name_nodes(graph) -> None:
    """Give unnamed nodes unique names: the converter names its Cast nodes after the nodes they feed."""
    for i, node in enumerate(graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"


def check_finite(model) -> None:
    """ExportError if a float16 constant is inf or NaN (it would poison every logit)."""
    import numpy as np
    from onnx import TensorProto, numpy_helper

    tensors = list(model.graph.initializer)
    tensors += [a.t for node in model.graph.node if node.op_type == "Constant" for a in node.attribute if a.name == "value"]
    for tensor in tensors:
        if tensor.data_type == TensorProto.FLOAT16 and not np.isfinite(numpy_helper.to_array(tensor)).all():
            raise ExportError(f"fp16 constant {tensor.name or '(unnamed)'} is not finite")
