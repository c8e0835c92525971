"""What the int8 model would answer on an x86 CPU without VNNI, emulated on this one.

    python -m benchmarks.int8_avx2_emulation [--int8 build/alexnet_acmix.int8.onnx] [--images 1000]

There, ONNX Runtime's uint8 x int8 kernels (MLAS, AVX2 or AVX-512 without VNNI) multiply the raw
bytes and add each pair of neighbouring products with VPMADDUBSW, which saturates at +-32767; the
zero points are subtracted afterwards. The reduction runs over (kernel tap, input channel), channel
fastest, in pairs. This script recomputes every quantized layer with constant weights that way in
NumPy on real validation images and counts the pair sums that saturate; then, for the stem (the one
layer whose input sits around a zero point of 128), it runs the rest of the graph in ONNX Runtime
on the stem's output computed exactly and with saturation, and prints the top-1 answers of each
against this CPU's, and the reference check at start (runtime/reference.py) on each. The exact
emulation must reproduce this CPU's logits: that checks the emulation itself.

runtime/int8_cpu_graph.py gives such CPUs uint8 weights for that layer (uint8 x uint8 kernels, which
do not saturate), so there they compute what this CPU computes: "served" is that graph as this CPU
runs it, compared with the exact stem.

Run under `python -m harness.hidden_cpu_features avx2 ...`, "this CPU" is ONNX Runtime's own AVX2
kernels (AVX-512 and VNNI hidden): the saturating emulation must then reproduce it, and "served"
is the graph the service would choose there.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from export.errors import ExportError
from model.cli import command, one_line_errors, positive_int
from model.data import DataError
from model.files import writable
from runtime.backend import BackendError
from runtime.cpu import describe
from runtime.onnx_graph import read_onnx

INT16 = (-32768, 32767)


def layer_inputs(graph) -> list[dict]:
    """Each Conv/MatMul/Gemm of a CPU graph (runtime/int8_cpu_graph.py cpu_graph) that reads a uint8
    input and constant int8 weights: its node, input tensor, zero point, scale, weights and scales."""
    from runtime.onnx_graph import attributes, index, initializer_arrays

    producers, _ = index(graph)
    values = initializer_arrays(graph)
    layers = []
    for node in graph.node:
        if node.op_type not in ("Conv", "MatMul", "Gemm"):
            continue
        source, weight = producers.get(node.input[0]), producers.get(node.input[1])
        if (source is None or weight is None or source.op_type != "DequantizeLinear"
                or weight.op_type != "DequantizeLinear" or weight.input[0] not in values
                or values[weight.input[0]].dtype != np.int8):
            continue
        layers.append({"node": node, "input": source.input[0], "zero_point": int(values[source.input[2]].reshape(-1)[0]),
                       "scale": float(values[source.input[1]].reshape(-1)[0]),
                       "weights": values[weight.input[0]].astype(np.int32),
                       "weight_scales": values[weight.input[1]].astype(np.float64),
                       "bias": _dequantized_bias(node, producers, values),
                       "attributes": attributes(node)})
    return layers


def _dequantized_bias(node, producers: dict, values: dict) -> np.ndarray | None:
    """A layer's bias as float64, where it is dequantized from a constant (int32 times scale)."""
    source = producers.get(node.input[2]) if len(node.input) > 2 else None
    if source is None or source.op_type != "DequantizeLinear" or source.input[0] not in values:
        return None
    return values[source.input[0]].astype(np.float64) * values[source.input[1]].astype(np.float64)


def reduction_rows(x: np.ndarray, layer: dict) -> tuple[np.ndarray, np.ndarray]:
    """(inputs [M, K], weights [outputs, K]) with K in the kernels' order: (tap, channel), channel
    fastest, padded with the zero point; K made even."""
    w = layer["weights"]
    if layer["node"].op_type == "Conv":
        a = layer["attributes"]
        kh, kw = a["kernel_shape"]
        sh, sw = a.get("strides", [1, 1])
        top, left, bottom, right = a.get("pads", [0, 0, 0, 0])
        x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)), constant_values=layer["zero_point"])
        n, c, h, width = x.shape
        oh, ow = (h - kh) // sh + 1, (width - kw) // sw + 1
        cols = np.empty((n, oh, ow, kh, kw, c), np.int32)
        for i in range(kh):
            for j in range(kw):
                cols[:, :, :, i, j, :] = x[:, :, i:i + sh * oh:sh, j:j + sw * ow:sw].transpose(0, 2, 3, 1)
        rows, weights = cols.reshape(n * oh * ow, -1), w.transpose(0, 2, 3, 1).reshape(len(w), -1)
    else:
        rows, weights = x.reshape(len(x), -1).astype(np.int32), w.T
    if rows.shape[1] % 2:
        rows, weights = np.pad(rows, ((0, 0), (0, 1))), np.pad(weights, ((0, 0), (0, 1)))
    return rows, weights


def accumulate(rows: np.ndarray, weights: np.ndarray, saturate: bool) -> tuple[np.ndarray, int]:
    """int32 accumulators [M, outputs] of raw bytes times weights, with each pair of products
    clamped to int16 where `saturate`; and how many pair sums were clamped."""
    acc = (rows.astype(np.float64) @ weights.T.astype(np.float64))
    clamped = 0
    if saturate:
        for start in range(0, len(rows), 128):
            r = rows[start:start + 128]
            pairs = r[:, None, 0::2] * weights[None, :, 0::2] + r[:, None, 1::2] * weights[None, :, 1::2]
            over = np.clip(pairs, *INT16) - pairs
            clamped += int(np.count_nonzero(over))
            acc[start:start + 128] += over.sum(-1)
    return acc, clamped


def stem_output(x_float: np.ndarray, stem: dict, saturate: bool) -> tuple[np.ndarray, int]:
    """The stem convolution's float output as the int8 kernels compute it (exactly, or saturating)."""
    q = np.clip(np.rint(x_float / stem["scale"]) + stem["zero_point"], 0, 255).astype(np.int32)
    rows, weights = reduction_rows(q, stem)
    acc, clamped = accumulate(rows, weights, saturate)
    y = (acc - stem["zero_point"] * weights.sum(1)[None]) * stem["scale"] * stem["weight_scales"][None] + stem["bias"][None]
    a = stem["attributes"]
    (kh, kw), (sh, sw), pads = a["kernel_shape"], a.get("strides", [1, 1]), a.get("pads", [0, 0, 0, 0])
    oh, ow = (x_float.shape[2] + pads[0] + pads[2] - kh) // sh + 1, (x_float.shape[3] + pads[1] + pads[3] - kw) // sw + 1
    return y.reshape(len(x_float), oh, ow, len(weights)).transpose(0, 3, 1, 2).astype(np.float32), clamped


@one_line_errors(BackendError, DataError, ExportError)
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.int8_avx2_emulation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--int8", default="build/alexnet_acmix.int8.onnx")
    parser.add_argument("--images", type=positive_int, default=1000, help="validation images for the top-1 comparison")
    parser.add_argument("--layer-images", type=positive_int, default=16, help="validation images for the per-layer counts")
    parser.add_argument("--data", default=None, help="CIFAR-10 training images (default: the lossless archive)")
    parser.add_argument("--out", default="build/bench/int8_avx2_emulation.json")
    args = parser.parse_args(argv)
    read_onnx(args.int8)  # ValueError naming the file where it is missing or no ONNX
    out = writable(args.out)  # before the measurement, not after it
    report = emulate(Path(args.int8), args.images, args.layer_images, args.data)
    print(report["text"])
    out.write_text(json.dumps({k: v for k, v in report.items() if k != "text"}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def validation_batches(data_path: str | None, count: int, batch: int = 50):
    """(images [n, 3, 128, 128], labels) of `count` validation images, in batches."""
    from model import paths
    from model.data import open_dataset, split_indices
    from model.preprocessing import preprocess_batch

    data = open_dataset(data_path or paths.DATA, split="train")
    _, val = split_indices(data, paths.SPLIT_FILE, 500, 42)
    chosen = np.sort(np.random.default_rng(0).choice(val, count, replace=False))
    for start in range(0, count, batch):
        picked = chosen[start:start + batch]
        yield preprocess_batch([data.images[i] for i in picked]), data.labels[picked]


def emulate(int8_path: Path, images: int, layer_images: int, data_path: str | None = None,
            batches=None) -> dict:
    """The figures (module docstring) as a dict with a printable "text". `batches`: an iterable of
    (images, labels) instead of the validation split."""
    import onnx
    from onnx import helper
    from tqdm import tqdm

    from runtime.int8_cpu_graph import cpu_graph
    from runtime.onnxruntime import create_session
    from runtime.reference import ReferenceError, compare, read_reference, reference_batch, reference_path

    graph_bytes = cpu_graph(int8_path, pairs_saturate=False)
    model = onnx.ModelProto.FromString(graph_bytes)
    layers = layer_inputs(model.graph)
    with tempfile.TemporaryDirectory() as tmp:
        probe = onnx.ModelProto.FromString(graph_bytes)
        for layer in layers:
            probe.graph.output.append(helper.make_tensor_value_info(layer["input"], onnx.TensorProto.UINT8, None))
        (Path(tmp) / "probe.onnx").write_bytes(probe.SerializeToString())
        stem = next(layer for layer in layers if layer["zero_point"])  # the image, quantized symmetrically
        rest = onnx.ModelProto.FromString(graph_bytes)
        rest.graph.node.remove(next(n for n in rest.graph.node if n.name == stem["node"].name))
        rest.graph.input.append(helper.make_tensor_value_info(stem["node"].output[0], onnx.TensorProto.FLOAT, None))
        (Path(tmp) / "rest.onnx").write_bytes(rest.SerializeToString())
        # the probe is the whole graph with the layers' inputs as outputs too: asked for the logits
        # only, it is this CPU's int8 model
        probe_session, rest_session = (create_session(Path(tmp) / name) for name in ("probe.onnx", "rest.onnx"))
        served_session = create_session(int8_path)  # what the service runs on this CPU

        def rest_logits(x, saturate):
            y, clamped = stem_output(x, stem, saturate)
            return rest_session.run(["logits"], {"image": x, stem["node"].output[0]: y})[0], clamped

        batches = list(batches) if batches is not None else list(validation_batches(data_path, images))
        # per layer: pair sums that saturate
        counts = {layer["node"].name: [0, 0] for layer in layers}
        probe_x = np.concatenate([x for x, _ in batches])[:layer_images]
        outputs = dict(zip([o.name for o in probe_session.get_outputs()], probe_session.run(None, {"image": probe_x}), strict=True))
        for layer in tqdm(layers, desc="layers", leave=False):
            rows, weights = reduction_rows(outputs[layer["input"]].astype(np.int32), layer)
            _, clamped = accumulate(rows, weights, saturate=True)
            counts[layer["node"].name] = [clamped, len(rows) * len(weights) * weights.shape[1] // 2]
        # end to end, the stem exact and saturating
        answers = {"this CPU": [], "exact": [], "saturating": [], "served": []}
        labels = []
        for x, y in tqdm(batches, desc="images", leave=False):
            answers["this CPU"].append(probe_session.run(["logits"], {"image": x})[0])
            answers["exact"].append(rest_logits(x, False)[0])
            answers["saturating"].append(rest_logits(x, True)[0])
            answers["served"].append(served_session.run(["logits"], {"image": x})[0])
            labels.append(y)
        logits = {name: np.concatenate(parts) for name, parts in answers.items()}
        labels = np.concatenate(labels)
        reference = None
        ref_file = reference_path(int8_path.with_name(int8_path.name.replace(".int8", "")))
        if ref_file.exists():
            ref = read_reference(ref_file)
            x = reference_batch(ref)
            reference = {}
            for name, got in (("this CPU", probe_session.run(["logits"], {"image": x})[0]), ("saturating", rest_logits(x, True)[0])):
                try:
                    outcome = compare(got, ref, "int8")
                    reference[name] = f"passes (max |logit diff| {outcome['max_abs_diff']:.2f})"
                except ReferenceError as exc:
                    reference[name] = str(exc)
    top = {name: values.argmax(1) for name, values in logits.items()}
    result = {
        "cpu": describe(), "int8": str(int8_path), "images": len(labels),
        "layers": {name: {"saturated_pairs": c, "pairs": t} for name, (c, t) in counts.items()},
        "exact_max_abs_diff": float(np.abs(logits["exact"] - logits["this CPU"]).max()),
        "saturating_max_abs_diff": float(np.abs(logits["saturating"] - logits["this CPU"]).max()),
        "served_vs_exact_max_abs_diff": float(np.abs(logits["served"] - logits["exact"]).max()),
        "top1": {name: float(np.mean(t == labels)) for name, t in top.items()},
        "agreement_with_this_cpu": {name: float(np.mean(t == top["this CPU"])) for name, t in top.items()},
        "reference_check": reference,
    }
    lines = [f"CPU: {result['cpu']}; {int8_path}",
             f"pair sums that saturate, on {len(probe_x)} images:"]
    lines += [f"  {name[:40]:40} {c / max(t, 1):.2e} ({c} of {t})" for name, (c, t) in counts.items()]
    lines.append(f"stem computed exactly vs this CPU's logits: max |diff| {result['exact_max_abs_diff']:.2e}; "
                 f"with saturation: {result['saturating_max_abs_diff']:.2e}")
    lines.append(f"the served graph (runtime/int8_cpu_graph.py, this CPU's choice) vs the exact stem: max |diff| "
                 f"{result['served_vs_exact_max_abs_diff']:.2e}")
    for name in ("this CPU", "exact", "saturating", "served"):
        lines.append(f"  {name:11} top-1 {result['top1'][name]:.4f} on {len(labels)} images, "
                     f"agrees with this CPU {result['agreement_with_this_cpu'][name]:.4f}")
    for name, outcome in (reference or {}).items():
        lines.append(f"  reference check, {name}: {outcome}")
    result["text"] = "\n".join(lines)
    return result


if __name__ == "__main__":
    sys.exit(command(main))
