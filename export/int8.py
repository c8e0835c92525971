"""fp32 ONNX -> INT8 QDQ ONNX: one quantized graph for ONNX Runtime (CPU) and TensorRT (explicit
quantization, strongly typed network; no calibrator API).

ONNX Runtime's static quantization (onnxruntime.quantization.quantize_static, pinned with
onnxruntime) writes QuantizeLinear/DequantizeLinear pairs around the convolutions and matrix
products: weights int8 symmetric per output channel, activations int8 symmetric per tensor (what
TensorRT requires: zero point 0), biases left float (TensorRT's ONNX parser dequantizes only 8-bit
values, not the quantizer's default int32 biases; ONNX Runtime's CPU graph quantizes them at load
as the quantizer would have, runtime/int8_cpu_graph.py, so its results are those of the int32
file of before to the bit), ranges at the 99.999th percentile of the calibration images'
values (top-1 agreement with fp32 on 256 validation images, on the weights shipped in session 8:
98.4%, against 96.5% at the 99.99th, 97.7% at the 99.9th and 96.9% with entropy; on the weights
before, MinMax 96.2% and the 99.99th percentile 97.8%, same
accuracy), one Q/DQ pair per consumer. Input `image` and output `logits` stay float32, so every
backend feeds and reads the same arrays.

What is quantized is the fp32 graph rewritten by `int8_source_graph`: ACmix's convolution path
folded into one dense convolution per layer (export/conv_fold.py: ONNX Runtime's int8 kernels run
the fp32 graph's grouped convolutions slowly, dense ones fast), the attention's head reordering
and scalar factors moved into the projections (export/projection_fold.py), and the attention and
classifier reading channels-last (export/channels_last.py), so that ONNX Runtime's layout
transposes cancel (docs/inference_speed.md, "INT8"). Each rewrite is exact algebra on the fp32 file; the fp32 file
itself keeps its form, which is the faster one in fp32. After quantization the convolutions'
outputs are quantized once, after their ReLU (`quantize_after_relu`).

Calibration images are held-out in the sense that matters: training images outside the
validation split, so that the validation accuracy of the int8 model stays an honest figure.
The ranges they give are kept in `model/weights/int8_calibration.json` with the digest of the
weights they belong to, of the graph they were measured on (tensor names) and of the image list:
building the same graph from those weights again (a Docker build has no data set) reuses them;
other weights or another graph need the images. The int8 ONNX records the digest of
its fp32 source and of the calibration (runtime/artifacts.py).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np

from export.channels_last import attention_channels_last, flatten_channels_last
from export.conv_fold import fold_grouped_convolutions
from export.errors import ExportError
from export.projection_fold import fold_into_projections
from model import paths
from model.files import replacing, write_bytes
from runtime.artifacts import (
    DERIVED_FORMS,
    SOURCE_DIGEST,
    WEIGHTS_DIGEST,
    derived_onnx_path,
    onnx_metadata,
    onnx_staleness,
)
from runtime.onnx_graph import index

CALIBRATION_TABLE = paths.WEIGHTS_DIR / "int8_calibration.json"
CALIBRATION_DIGEST = "calibration_sha256"
CALIBRATION_SEED = 0
OP_TYPES = ["Conv", "MatMul", "Gemm"]
# Weights quantized along their output channel, the only per-channel axis TensorRT's explicit
# quantization takes: a Conv's [Cout, Cin, kh, kw] axis 0, a MatMul's constant [K, N] axis 1 (ONNX
# Runtime's defaults too, pinned here; a Gemm's follows its transB, the quantizer's own rule).
PER_CHANNEL_AXIS = {"Conv": 0, "MatMul": 1}


class ImageBatches:
    """ONNX Runtime's CalibrationDataReader over preprocessed images, `batch` at a time."""

    def __init__(self, images: np.ndarray, batch: int = 32):
        self.chunks = iter([images[i : i + batch] for i in range(0, len(images), batch)])

    def get_next(self):
        chunk = next(self.chunks, None)
        return None if chunk is None else {"image": chunk}

    def rewind(self):  # pragma: no cover - the MinMax calibrator reads once
        raise NotImplementedError


def calibration_images(data: str | Path, split_file: str | None, count: int) -> tuple[np.ndarray, dict]:
    """`count` preprocessed training images outside the validation split, seeded, and what they are."""
    from model.data import DataError, open_dataset
    from model.preprocessing import preprocess_batch

    try:
        images = open_dataset(data, split="train" if split_file else "all", val_split=split_file)
    except DataError as exc:
        raise ExportError(f"calibration images: {exc}") from None
    if len(images) < count:
        raise ExportError(f"calibration images: {data} holds {len(images)} images outside the validation split, "
                          f"{count} are asked for")
    picks = np.sort(np.random.default_rng(CALIBRATION_SEED).choice(len(images), size=count, replace=False))
    names = [images.sources[i] for i in picks]
    described = {"archive": Path(data).name, "count": count, "seed": CALIBRATION_SEED,
                 "names_sha256": hashlib.sha256("\n".join(names).encode()).hexdigest()}
    return preprocess_batch([images.images[i] for i in picks]), described


def read_table(path: Path) -> dict | None:
    try:
        table = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path}: not a calibration table ({exc})") from None
    if not isinstance(table, dict) or not {"weights_sha256", "images", "ranges"} <= set(table):
        raise ExportError(f"{path}: not a calibration table (needs weights_sha256, images and ranges)")
    return table


def graph_digest(model) -> str:
    """sha256 of a graph's structure: its nodes' types, inputs and outputs (the tensor names that
    calibration ranges are keyed by), not its weights."""
    digest = hashlib.sha256()
    for node in model.graph.node:
        digest.update(f"{node.op_type}({','.join(node.input)})->{','.join(node.output)};".encode())
    return digest.hexdigest()


def int8_source_graph(model) -> None:
    """Rewrite, in place, an fp32 graph into the graph that is quantized: ACmix's convolution path as
    one dense convolution (conv_fold), the attention's reordering and scalar factors in the
    projections (projection_fold), the attention and the classifier reading channels-last
    (channels_last). Each step is exact algebra on the fp32 graph."""
    fold_grouped_convolutions(model)
    fold_into_projections(model)
    attention_channels_last(model)
    flatten_channels_last(model)


def quantize_after_relu(model) -> int:
    """Remove, in place, each QuantizeLinear/DequantizeLinear pair between a tensor and a Relu that
    is its only reader, so that the tensor is quantized once, after the Relu (where the quantizer
    puts the next pair); returns how many pairs went. TensorRT fuses a convolution with its ReLU
    and the quantization after; ONNX Runtime's CPU graph folds the ReLU into that quantization
    (runtime/int8_cpu_graph.py). Before, the pair made ONNX Runtime dequantize the stem's output to
    float for the ReLU: 10 ms of 78 in one profile at batch 128 on an AMD EPYC (docs/inference_speed.md, "INT8")."""
    graph = model.graph
    producer, readers = index(graph)
    removed = 0
    for relu in [n for n in graph.node if n.op_type == "Relu"]:
        dequantize = producer.get(relu.input[0])
        if dequantize is None or dequantize.op_type != "DequantizeLinear" or len(readers[relu.input[0]]) != 1:
            continue
        quantize = producer.get(dequantize.input[0])
        if quantize is None or quantize.op_type != "QuantizeLinear" or len(readers[quantize.output[0]]) != 1:
            continue
        relu.input[0] = quantize.input[0]
        graph.node.remove(dequantize)
        graph.node.remove(quantize)
        removed += 1
    return removed


def int8_beside(onnx_path: str | Path) -> Path:
    """The int8 file beside the fp32 `onnx_path` (runtime/artifacts.py names it), made again with
    quantize_int8's defaults where it is missing or was made from another fp32 file."""
    int8 = derived_onnx_path(onnx_path, "int8")
    if onnx_staleness(int8, onnx_path, key=SOURCE_DIGEST, form=DERIVED_FORMS["int8"]):
        print(f"making {int8} from {onnx_path} (export/int8.py)")
        quantize_int8(onnx_path, int8)
    return int8


def quantize_int8(onnx_in: str | Path, onnx_out: str | Path, data: str | Path | None = paths.DATA,
                  split_file: str | None = paths.SPLIT_FILE, count: int = 512,
                  table_path: str | Path | None = None, table_out: str | Path | None = None) -> Path:
    """Write the int8 QDQ version of the fp32 `onnx_in` to `onnx_out`; returns the path.

    Uses the calibration table (default CALIBRATION_TABLE) when it belongs to the weights `onnx_in`
    was exported from and to the graph quantized, else calibrates on `count` images of `data` and
    writes the table (to `table_out` where given: run_derived stages it until the file passed its
    checks).
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from export.fp16 import read_fp32_source, set_source

    onnx_in, onnx_out = Path(onnx_in), Path(onnx_out)
    table_path = Path(table_path) if table_path is not None else CALIBRATION_TABLE
    folded = read_fp32_source(onnx_in)
    weights_digest = onnx_metadata(onnx_in).get(WEIGHTS_DIGEST)
    table = read_table(table_path)
    with tempfile.TemporaryDirectory(prefix="int8.") as tmp:
        int8_source_graph(folded)
        structure = graph_digest(folded)
        prepared = Path(tmp) / "folded.onnx"
        onnx.save(folded, str(prepared))
        reuse = (table is not None and weights_digest is not None and table["weights_sha256"] == weights_digest
                 and table.get("graph_sha256") == structure)
        cache = Path(tmp) / "ranges.json"
        reader = None
        if reuse:
            cache.write_text(json.dumps(table["ranges"]))
        else:
            if data is None or not Path(data).exists():
                why = ("there is none" if table is None else "it is for other weights"
                       if table["weights_sha256"] != weights_digest else "it is for another graph")
                missing = "there is no data set" if data is None else f"the calibration images are not here ({data})"
                raise ExportError(f"{table_path}: cannot reuse the calibration ({why}) and {missing}; "
                                  "run where the data set is")
            images, described = calibration_images(data, split_file, count)
            reader = ImageBatches(images)
        quantized = Path(tmp) / "int8.onnx"
        try:
            quantize_static(
                str(prepared), str(quantized), reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=OP_TYPES,
                per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.Percentile, calibration_cache_path=str(cache),
                extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "CalibPercentile": 99.999,
                               "DedicatedQDQPair": True, "QuantizeBias": False,
                               "QDQOpTypePerChannelSupportToAxis": PER_CHANNEL_AXIS},
            )
        except (ValueError, RuntimeError, KeyError) as exc:
            raise ExportError(f"{onnx_in}: quantization failed ({str(exc).splitlines()[0][:200]})") from None
        ranges = json.loads(cache.read_text())
        model = onnx.load(str(quantized))
    quantize_after_relu(model)
    if not reuse:
        table = {"weights_sha256": weights_digest, "graph_sha256": structure, "images": described, "ranges": ranges}
        write_bytes(table_out or table_path, (json.dumps(table, indent=1, sort_keys=True) + "\n").encode())
    del model.metadata_props[:]
    model.metadata_props.extend(folded.metadata_props)
    set_source(model, onnx_in)
    for key, value in DERIVED_FORMS["int8"].items():
        model.metadata_props.add(key=key, value=value)
    model.metadata_props.add(key=CALIBRATION_DIGEST, value=hashlib.sha256(
        json.dumps(table["ranges"], sort_keys=True).encode()).hexdigest())
    onnx.checker.check_model(model)
    with replacing(onnx_out) as tmp:
        onnx.save(model, tmp)
    return onnx_out
