"""Logits to what the API returns: probabilities, top-k, labels."""

from __future__ import annotations

import numpy as np

from model.spec import CLASSES


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def classify(logits: np.ndarray, top_k: int) -> dict:
    """One image's logits [10] to label, class_id, confidence and the top-k classes."""
    probabilities = softmax(logits.astype(np.float64))
    order = np.argsort(-probabilities, kind="stable")[:top_k]
    best = int(order[0])
    return {
        "label": CLASSES[best],
        "class_id": best,
        "confidence": float(probabilities[best]),
        "top_k": [
            {"label": CLASSES[i], "class_id": int(i), "probability": float(probabilities[i])} for i in order
        ],
    }


def classification_strings(logits: np.ndarray, k: int) -> list[list[str]]:
    """Triton's classification extension: per image, k strings "value:index:label", best first."""
    order = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
    return [[f"{row[i]:.6f}:{i}:{CLASSES[i]}" for i in idx] for row, idx in zip(logits, order, strict=True)]
