"""Logits to what the API returns: calibrated probabilities, top-k, labels.

`confidence` and `probability` are softmax(logits / T) with the temperature T shipped with the
weights and recorded in the served ONNX (model/calibration.py); T = 1 where the ONNX records none.
The `logits` of /v2 stay the model's raw logits.
"""

from __future__ import annotations

import numpy as np

from model.calibration import probabilities
from model.spec import CLASSES


def classify(logits: np.ndarray, top_k: int, temperature: float = 1.0) -> dict:
    """One image's logits [10] to label, class_id, confidence and the top-k classes."""
    probs = probabilities(logits, temperature)
    order = np.argsort(-probs, kind="stable")[:top_k]
    best = int(order[0])
    return {
        "label": CLASSES[best],
        "class_id": best,
        "confidence": float(probs[best]),
        "top_k": [{"label": CLASSES[i], "class_id": int(i), "probability": float(probs[i])} for i in order],
    }


def classification_strings(logits: np.ndarray, k: int) -> list[list[str]]:
    """Triton's classification extension: per image, k strings "value:index:label", best first (raw
    logits, as Triton reports the output it classifies)."""
    order = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
    return [[f"{row[i]:.6f}:{i}:{CLASSES[i]}" for i in idx] for row, idx in zip(logits, order, strict=True)]
