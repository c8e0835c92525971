"""Top-1 of the served ONNX files, fp32 and int8, on the held-out validation split, lossless and as JPEG q75.

    python -m benchmarks.precision_accuracy [--onnx build/alexnet_acmix.onnx] [--data D] [--jpeg-data J]

Each file runs in ONNX Runtime on the CPU with the service's options (runtime.onnxruntime
create_session) over the whole split, preprocessed as the service preprocesses (model/preprocessing.py).
Prints the CPU, and for each copy of the images and each precision: top-1, its difference from fp32
in points and its top-1 agreement with fp32 (issue 14's target: int8 within 1.0 point); writes
build/bench/precision_accuracy.json. The int8 file beside --onnx is made again (export/int8.py) where
it is missing or was made from another fp32 file. Its calibration reads 512 of the same held-out
images (export/int8.py): they set activation ranges, not weights.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from export.errors import ExportError
from model import paths
from model.cli import command, one_line_errors
from model.data import DataError
from model.files import writable
from runtime.backend import BackendError

CHUNK = 250  # images preprocessed and run at a time: 5,000 at once would hold ~1 GB of float input


def served_files(onnx: Path, weights: str = paths.WEIGHTS) -> dict[str, Path]:
    """{"fp32": onnx, "int8": the int8 file beside it, made again where stale}; DataError where the fp32
    file is missing or was exported from other weights than the shipped ones (its figures would be
    another model's)."""
    from export.int8 import int8_beside
    from runtime.artifacts import onnx_staleness

    stale = onnx_staleness(onnx, weights)
    if stale:
        raise DataError(f"{stale}; export it first: python -m export onnx")
    return {"fp32": onnx, "int8": int8_beside(onnx)}


def run_logits(session, images: list[np.ndarray], desc: str) -> np.ndarray:
    """The session's logits for uint8 images, preprocessed CHUNK at a time."""
    from export.verify import run_onnx
    from model.preprocessing import preprocess_batch

    return np.concatenate([run_onnx(session, preprocess_batch(images[start:start + CHUNK]))
                           for start in tqdm(range(0, len(images), CHUNK), desc=desc, unit="chunk")])


def compare_precisions(files: dict[str, Path], copies: dict[str, str], split_file: str | None) -> list[dict]:
    """precision_rows for each copy of the images (its held-out split; all of it without a split file)."""
    from model.data import open_dataset
    from runtime.onnxruntime import create_session

    sessions = {precision: create_session(path, providers=["CPUExecutionProvider"]) for precision, path in files.items()}
    rows = []
    for copy, data in copies.items():
        images = open_dataset(data, split="val", val_split=split_file)
        logits = {precision: run_logits(session, images.images, f"{precision} on {copy}")
                  for precision, session in sessions.items()}
        rows += [{"copy": copy, "data": str(data), "file": str(files[row["precision"]]), **row}
                 for row in precision_rows(logits, images.labels)]
    return rows


def precision_rows(logits: dict[str, np.ndarray], labels: np.ndarray) -> list[dict]:
    """Per precision: top-1, its difference from fp32's in points, top-1 agreement with fp32."""
    fp32 = logits["fp32"].argmax(1)
    fp32_accuracy = float((fp32 == labels).mean())
    rows = []
    for precision, values in logits.items():
        predictions = values.argmax(1)
        accuracy = float((predictions == labels).mean())
        rows.append({"precision": precision, "n": int(len(labels)), "accuracy": accuracy,
                     "points_from_fp32": (accuracy - fp32_accuracy) * 100,
                     "top1_agreement_with_fp32": float((predictions == fp32).mean())})
    return rows


def present_copies(data: str, jpeg_data: str | None) -> dict[str, str]:
    """{"lossless": data, "jpeg_q75": jpeg_data} for those present; DataError without the lossless one."""
    if not Path(data).exists():
        raise DataError(f"{data}: no such data set (the lossless training images: ../shared/data beside the project, or ACMIX_DATA_DIR)")
    copies = {"lossless": data}
    if jpeg_data and Path(jpeg_data).exists():
        copies["jpeg_q75"] = jpeg_data
    else:
        print(f"{jpeg_data}: absent; the JPEG q75 copy is skipped")
    return copies


@one_line_errors(BackendError, DataError, ExportError)
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.precision_accuracy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--onnx", default=paths.ONNX, help="the fp32 ONNX that is served; int8 beside it")
    parser.add_argument("--data", default=paths.DATA, help="the lossless images")
    parser.add_argument("--jpeg-data", default=paths.JPEG_DATA, help="their JPEG q75 copy (skipped when absent)")
    parser.add_argument("--split-file", default=paths.SPLIT_FILE,
                        help="the held-out validation list ('': every image of --data)")
    parser.add_argument("--weights", default=paths.WEIGHTS, help="the weights --onnx must have been exported from")
    parser.add_argument("--out", default="build/bench/precision_accuracy.json")
    args = parser.parse_args(argv)
    from runtime.cpu import cpu_info, describe

    copies = present_copies(args.data, args.jpeg_data)
    files = served_files(Path(args.onnx), args.weights)
    writable(args.out)  # before the measurement, not after it
    print(f"CPU: {describe()}")
    rows = compare_precisions(files, copies, args.split_file or None)
    print(f"{'images':<9} {'precision':<9} {'top-1':>7} {'points from fp32':>17} {'agreement with fp32':>20}")
    for row in rows:
        print(f"{row['copy']:<9} {row['precision']:<9} {row['accuracy']:>7.4f} {row['points_from_fp32']:>+17.2f} "
              f"{row['top1_agreement_with_fp32']:>20.2%}")
    Path(args.out).write_text(json.dumps({"cpu": cpu_info(), "split_file": args.split_file, "rows": rows}, indent=2)
                              + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(command(main))
