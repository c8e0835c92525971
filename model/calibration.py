"""Calibrated confidence: one temperature T for the softmax, fitted on the validation split.

A 10-class network's softmax is over-confident; softmax(logits / T) with T fitted to minimize the
negative log-likelihood on held-out images (Guo et al., "On Calibration of Modern Neural
Networks", 2017) keeps every top-1 and makes the confidence mean what it says. The expected
calibration error (ECE, 15 equal-width confidence bins) measures it. NumPy only: the service
applies the same `probabilities` to the logits of whichever backend runs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

ECE_BINS = 15
CALIBRATION_FILE = "calibration.json"  # beside the shipped weights


def probabilities(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / temperature) over the last axis, in float64."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    scaled -= scaled.max(axis=-1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=-1, keepdims=True)


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    top = scaled.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(scaled - top).sum(axis=1)) + top[:, 0]
    return float((log_z - scaled[np.arange(len(labels)), labels]).mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray, low: float = 0.05, high: float = 20.0) -> float:
    """The temperature of least NLL, by golden-section search on log T (the NLL is unimodal in it)."""
    if len(labels) == 0:
        raise ValueError("no images to fit a temperature on")
    a, b = math.log(low), math.log(high)
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = (negative_log_likelihood(logits, labels, math.exp(x)) for x in (c, d))
    while b - a > 1e-6:
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = negative_log_likelihood(logits, labels, math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = negative_log_likelihood(logits, labels, math.exp(d))
    return math.exp((a + b) / 2)


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> list[dict]:
    """Per equal-width confidence bin: its bounds, how many images, their mean confidence and accuracy."""
    confidence, predicted = probs.max(axis=1), probs.argmax(axis=1)
    correct = predicted == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    rows = []
    for i in range(bins):
        inside = (confidence > edges[i]) & (confidence <= edges[i + 1]) if i else (confidence <= edges[1])
        count = int(inside.sum())
        rows.append({
            "low": float(edges[i]), "high": float(edges[i + 1]), "count": count,
            "confidence": float(confidence[inside].mean()) if count else None,
            "accuracy": float(correct[inside].mean()) if count else None,
        })
    return rows


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Sum over bins of (share of images) * |accuracy - mean confidence|."""
    total = len(labels)
    return float(sum(row["count"] / total * abs(row["accuracy"] - row["confidence"])
                     for row in reliability(probs, labels, bins) if row["count"]))


def calibrate(logits: np.ndarray, labels: np.ndarray) -> dict:
    """The temperature and the ECE before and after, on these images; and, so that the figure is
    not only in-sample, the ECE of a temperature fitted on each half applied to the other half."""
    temperature = fit_temperature(logits, labels)
    halves = np.array_split(np.random.default_rng(0).permutation(len(labels)), 2)
    crossed = np.concatenate([
        probabilities(logits[test], fit_temperature(logits[fit], labels[fit]))
        for fit, test in ((halves[0], halves[1]), (halves[1], halves[0]))
    ])
    return {
        "temperature": temperature,
        "n": int(len(labels)),
        "ece_before": expected_calibration_error(probabilities(logits), labels),
        "ece_after": expected_calibration_error(probabilities(logits, temperature), labels),
        "ece_after_cross_fitted": expected_calibration_error(crossed, labels[np.concatenate(halves[::-1])]),
        "nll_before": negative_log_likelihood(logits, labels, 1.0),
        "nll_after": negative_log_likelihood(logits, labels, temperature),
        "bins": ECE_BINS,
    }


def plot_reliability(logits: np.ndarray, labels: np.ndarray, temperature: float, path: Path) -> None:
    """Reliability diagram before and after the temperature: accuracy against confidence per bin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), sharey=True)
    for ax, (title, t) in zip(axes, (("softmax (T = 1)", 1.0), (f"calibrated (T = {temperature:.3f})", temperature)),
                              strict=True):
        probs = probabilities(logits, t)
        rows = [row for row in reliability(probs, labels) if row["count"]]
        centers = [(row["low"] + row["high"]) / 2 for row in rows]
        ax.bar(centers, [row["accuracy"] for row in rows], width=1 / ECE_BINS, edgecolor="black", alpha=0.7,
               label="accuracy in the bin")
        ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
        ax.plot(centers, [row["confidence"] for row in rows], "o", color="crimson", label="mean confidence")
        ece = expected_calibration_error(probs, labels)
        ax.set(xlabel="confidence (top-1 probability)", title=f"{title}: ECE {ece:.4f}", xlim=(0, 1), ylim=(0, 1))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 accuracy")
    axes[0].legend(loc="upper left")
    fig.suptitle(f"Reliability on {len(labels)} validation images ({ECE_BINS} bins)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def read_temperature(weights_folder: str | Path) -> float | None:
    """The temperature shipped beside the weights in `weights_folder`, or None where there is none."""
    path = Path(weights_folder) / CALIBRATION_FILE
    if not path.is_file():
        return None
    return float(json.loads(path.read_text())["temperature"])
