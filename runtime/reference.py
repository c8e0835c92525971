"""Reference logits recorded at export, and the check that a loaded backend reproduces them.

`python -m export onnx` writes `<onnx>.reference.json` beside the fp32 ONNX: a few real
validation images (encoded PNG, the bytes a client would upload) and the logits Paddle computed
for them through the one preprocessing. Images are picked with a wide margin between their two
best logits, so that an fp16 or int8 artifact keeps their top-1 while a wrong one does not.

`check` decodes and preprocesses the images as the service does, runs them through a loaded
backend, and names what differs: so an engine is recorded as usable (export/engine.py) and the
service turns ready (service/main.py) only when backend, artifact and preprocessing are right.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# The source a reference file names when the export had no data set (export/verify.py): images that
# check the arithmetic, not the model on real inputs.
NOISE = "generated noise images"
# Largest |logit - reference| each precision may show on a reference image: the larger of an absolute
# bound and a share of that image's largest |reference logit|. Measured here: fp32 ONNX Runtime
# against Paddle ~1e-5 (the export's check). int8 clips activations at its calibrated range (the
# 99.999th percentile, export/int8.py), so its error grows with the image's activations: on the
# weights shipped in session 18, 2,000 validation images (ONNX Runtime, AMD EPYC Zen 5) differ by
# at most 0.95 where the largest logit is under 20, by 4.1 on one whose largest is 41.7 (a reference
# image: a fixed bound of 1.0 refused the correct file), and by at most 0.098 of the largest logit
# where it is 10 or more; so int8 may differ by max(1.0, 0.15 x the largest |logit|), of which those
# images reach 0.71 at most (docs/inference_speed.md, "The int8 reference check"). fp16's is not
# recorded; TensorRT has not run here.
LOGIT_TOLERANCE = {"fp32": 1e-3, "fp16": 0.1, "int8": 1.0}
RELATIVE_TOLERANCE = {"fp32": 0.0, "fp16": 0.0, "int8": 0.15}


class ReferenceError(ValueError):
    """A reference file that cannot be read, or a backend that does not reproduce it."""


@dataclass
class Reference:
    images: list[bytes]  # encoded image files
    logits: np.ndarray  # float32 [N, classes], Paddle fp32
    source: str  # where the images came from

    def to_json(self) -> str:
        return json.dumps({
            "source": self.source,
            "images": [base64.b64encode(image).decode() for image in self.images],
            "logits": self.logits.astype(float).round(6).tolist(),
        }, indent=1) + "\n"


def reference_path(onnx_path: str | Path) -> Path:
    """build/alexnet_acmix.onnx -> build/alexnet_acmix.onnx.reference.json"""
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(onnx_path.name + ".reference.json")


def read_reference(path: str | Path) -> Reference:
    try:
        record = json.loads(Path(path).read_text())
        images = [base64.b64decode(image) for image in record["images"]]
        logits = np.asarray(record["logits"], dtype=np.float32)
        if logits.ndim != 2 or len(logits) != len(images) or not images:
            raise ValueError(f"{len(images)} images and logits of shape {list(logits.shape)}")
        return Reference(images, logits, str(record.get("source", "")))
    except FileNotFoundError:
        raise ReferenceError(f"{path}: no reference file (python -m export onnx writes it)") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ReferenceError(f"{path}: not a reference file ({exc})") from None


def reference_batch(reference: Reference) -> np.ndarray:
    """The reference images as the network's input batch, preprocessed as served."""
    from model.preprocessing import decode_image, preprocess

    return np.stack([preprocess(decode_image(image)) for image in reference.images])


def tolerances(reference_logits: np.ndarray, precision: str) -> np.ndarray:
    """Each reference image's largest allowed |logit diff| for `precision` (LOGIT_TOLERANCE)."""
    scale = np.abs(reference_logits).max(axis=1)
    return np.maximum(LOGIT_TOLERANCE[precision], RELATIVE_TOLERANCE[precision] * scale)


def compare(logits: np.ndarray, reference: Reference, precision: str = "fp32") -> dict:
    """The figures of `logits` (of reference_batch) against the reference's, or ReferenceError naming
    what differs: an image whose largest logit difference is over its tolerance for the precision
    (`tolerances`), or a top-1 that changed where the tolerance cannot explain it. Each logit may
    move by the tolerance, so two best logits closer than twice it may swap (generated noise images,
    the reference where the export had no data set, have such narrow margins; int8 swapped one);
    wider ones may not. "tolerance" is that of the image closest to its own."""
    per_image = np.abs(logits - reference.logits).max(axis=1)
    allowed = tolerances(reference.logits, precision)
    worst = int(np.argmax(np.where(np.isfinite(per_image), per_image / allowed, np.inf)))
    diff = float(per_image.max())
    top2 = np.sort(reference.logits, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    changed = logits.argmax(1) != reference.logits.argmax(1)
    flipped = np.flatnonzero(changed & (margin > 2 * allowed))
    result = {"n": len(logits), "max_abs_diff": diff, "top1_changed": int(changed.sum()), "precision": precision,
              "tolerance": float(allowed[worst]), "worst_image": worst}
    if len(flipped):
        raise ReferenceError(f"reference check failed: the top-1 class of {len(flipped)} of {len(logits)} "
                             f"reference images changed (first: image {flipped[0]}, whose two best logits were "
                             f"{margin[flipped[0]]:.3g} apart); max |logit diff| {diff:.3g}")
    if not np.isfinite(per_image[worst]) or per_image[worst] > allowed[worst]:
        raise ReferenceError(f"reference check failed: |logit diff| {per_image[worst]:.3g} on reference image "
                             f"{worst} over its {precision} tolerance {allowed[worst]:.3g} "
                             f"({len(logits)} reference images)")
    return result


def check(backend, reference: Reference, precision: str = "fp32") -> dict:
    """Run the reference images through `backend` (loaded) and compare its logits (`compare`)."""
    batch = reference_batch(reference)
    logits = np.concatenate([backend.infer(batch[i : i + backend.max_batch])
                             for i in range(0, len(batch), backend.max_batch)])
    return compare(logits, reference, precision)
