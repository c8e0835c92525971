"""Record the reference images and their Paddle logits beside an exported ONNX (runtime/reference.py)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from export.verify import held_out_images
from model.files import write_bytes
from runtime.reference import Reference, reference_path

REFERENCE_IMAGES = 16
# Two best logits at least this far apart, widest first: int8's error on them (runtime/reference.py)
# does not flip them.
MIN_MARGIN = 3.0


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def choose(logits: np.ndarray, count: int = REFERENCE_IMAGES, min_margin: float = MIN_MARGIN) -> np.ndarray:
    """Indices of `count` images, round-robin over predicted classes, widest margins first (those
    below min_margin only when too few are above it)."""
    top2 = np.sort(logits, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    order = np.argsort(-margin, kind="stable")
    wide = [i for i in order if margin[i] >= min_margin] or list(order)
    by_class: dict[int, list[int]] = {}
    for i in wide:
        by_class.setdefault(int(logits[i].argmax()), []).append(i)
    chosen: list[int] = []
    while len(chosen) < min(count, len(wide)):
        for members in by_class.values():
            if members and len(chosen) < count:
                chosen.append(members.pop(0))
    return np.array(chosen[:count])


def write_reference(onnx_path: str | Path, model, data: str | Path | None, split_file: str | None) -> Path:
    """Pick reference images, compute their logits with the Paddle `model`, write them beside `onnx_path`."""
    from model.predict import preprocessed_logits
    from model.preprocessing import decode_image, preprocess

    images, source = held_out_images(data, 256, split_file)
    encoded = [png_bytes(image) for image in images]
    batch = np.stack([preprocess(decode_image(data)) for data in encoded])
    logits = preprocessed_logits(model, batch)
    picks = choose(logits)
    reference = Reference([encoded[i] for i in picks], logits[picks], source)
    return write_bytes(reference_path(onnx_path), reference.to_json().encode())
