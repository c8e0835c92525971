"""Evaluate weights on a CIFAR-10 split: top-1 and per-class accuracy, a confusion-matrix PNG.

    python -m model.evaluate [--weights W] [--data D] [--split auto|all|train|test|val] [--json]

--data takes either format (model/data.py). With --json the last line printed is one JSON object
with accuracy (a fraction), n, per_class and the confusion matrix.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from model import paths
from model.cli import command, fail, positive_int
from model.data import CLASSES, SPLITS, DataError, held_out_subset, open_dataset
from model.files import missing, writable
from model.runtime import DEVICES, import_paddle, resolve_device

DEFAULT_WEIGHTS = paths.WEIGHTS
DEFAULT_DATA = paths.DATA
DEFAULT_SPLIT_FILE = paths.SPLIT_FILE


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, classes: int = len(CLASSES)) -> np.ndarray:
    """[true class, predicted class] counts."""
    matrix = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(matrix, (labels, predictions), 1)
    return matrix


def summarize(labels: np.ndarray, predictions: np.ndarray) -> dict:
    matrix = confusion_matrix(labels, predictions)
    totals = matrix.sum(axis=1)
    per_class = {
        name: (float(matrix[i, i] / totals[i]) if totals[i] else None) for i, name in enumerate(CLASSES)
    }
    return {
        "accuracy": float((labels == predictions).mean()) if len(labels) else 0.0,
        "n": int(len(labels)),
        "per_class": per_class,
        "confusion_matrix": matrix.tolist(),
    }


def plot_confusion(matrix: np.ndarray, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    totals = matrix.sum(axis=1, keepdims=True)
    fractions = matrix / np.maximum(totals, 1)
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    im = ax.imshow(fractions, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(CLASSES)), CLASSES, rotation=45, ha="right")
    ax.set_yticks(range(len(CLASSES)), CLASSES)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    for i in range(len(CLASSES)):
        for j in range(len(CLASSES)):
            color = "white" if fractions[i, j] > 0.5 else "black"
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=7, color=color)
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the true class")
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")  # at `path` itself: without a suffix matplotlib adds ".png"
    plt.close(fig)


def evaluate(weights: str, data: str, split: str, split_file: str, confusion: Path, arch: str = "alexnet_acmix",
             batch_size: int = 256, device: str = "cpu", keep_logits: bool = False) -> dict:
    """Top-1, per-class accuracy and confusion matrix of `weights` on `data` [split]; writes the
    confusion-matrix PNG. keep_logits adds the logits and labels (for calibration). DataError or
    ValueError name what is wrong with the inputs."""
    if why := missing(weights, "weights file"):
        raise DataError(why)
    confusion = writable(confusion)  # before the evaluation, not after it
    if split == "auto":  # the held-out images of the training set the split file was drawn from, else all
        images = open_dataset(data, split="all")
        held_out = held_out_subset(images, split_file)
        images, split = (held_out, "val") if held_out is not None else (images, "all")
    else:
        images = open_dataset(data, split=split, val_split=split_file)
    import_paddle(device=device)  # threads for every core, before the model runs
    from model.predict import load_weights, predict_logits

    model = load_weights(arch, weights)
    logits = predict_logits(model, images.images, batch_size, progress="evaluating")
    result = summarize(images.labels, logits.argmax(axis=1))
    result.update({"weights": str(weights), "data": str(data), "split": split})
    plot_confusion(
        np.array(result["confusion_matrix"]), confusion,
        f"{Path(weights).name} on {Path(data).name} [{split}]: top-1 {result['accuracy']:.4f}",
    )
    result["confusion_png"] = str(confusion)
    if keep_logits:
        result.update(logits=logits, labels=images.labels)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default=DEFAULT_WEIGHTS)
    parser.add_argument("--arch", default="alexnet_acmix", choices=["alexnet_acmix", "alexnet"])
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--split", default="auto", choices=("auto", *SPLITS),
                        help="auto: val (the held-out images) where the data holds every image the split file "
                             "lists (the shared training archives, in either format, wherever they are), else all")
    parser.add_argument("--device", default="auto", choices=DEVICES,
                        help="auto: a CUDA GPU where Paddle is a CUDA build and one is visible, else the CPU")
    parser.add_argument("--split-file", default=DEFAULT_SPLIT_FILE, help="the held-out validation list")
    parser.add_argument("--batch-size", type=positive_int, default=256)
    parser.add_argument("--confusion", default="build/confusion_matrix.png", help="PNG to write")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    args = parser.parse_args(argv)

    try:
        device, reason = resolve_device(args.device)
        result = evaluate(args.weights, args.data, args.split, args.split_file, Path(args.confusion), args.arch,
                          args.batch_size, device)
    except (DataError, ValueError, OSError) as exc:
        return fail(exc)
    confusion = Path(args.confusion)
    print(f"top-1 accuracy {result['accuracy']:.4f} on {result['n']} images ({args.data}, split {result['split']}; "
          f"on the {device.upper()}: {reason})")
    for name, accuracy in result["per_class"].items():
        print(f"  {name:<11} {accuracy:.4f}" if accuracy is not None else f"  {name:<11} -")
    print(f"confusion matrix: {confusion}")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(command(main))
