"""Checks of exported artifacts. Every verifier returns its figures and raises ExportError, with the
figures in the message, when the artifact fails; callers only print.

* `verify_onnx`: onnx.checker, then ONNX Runtime against Paddle on real images;
* `verify_derived`: an fp16 or int8 ONNX against the fp32 one, in ONNX Runtime, on held-out images;
* `verify_reference`: an fp16 or int8 ONNX, in ONNX Runtime, against the reference logits recorded
  at export (the service's check at start);
* `verify_engine`: a TensorRT engine against the same reference logits.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from export.errors import ExportError
from model.spec import INPUT_NAME, OUTPUT_NAME
from runtime.reference import NOISE

MAX_LOGIT_DIFF = 1e-4
# Top-1 agreement with ONNX Runtime's fp32 model that a derived ONNX must reach.
MIN_TOP1_AGREEMENT = {"fp16": 0.995, "int8": 0.97}


def onnx_session(path: str | Path):
    """The project's ONNX Runtime session (runtime/onnxruntime.py) on the CPU; ExportError if unusable."""
    from runtime.backend import BackendError
    from runtime.onnxruntime import create_session

    try:
        return create_session(path, providers=["CPUExecutionProvider"])
    except BackendError as exc:
        raise ExportError(str(exc)) from None


def run_onnx(session, batch: np.ndarray, chunk: int = 64) -> np.ndarray:
    return np.concatenate(
        [session.run([OUTPUT_NAME], {INPUT_NAME: batch[i : i + chunk]})[0] for i in range(0, len(batch), chunk)]
    )


def compare(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """Max absolute logit difference and top-1 agreement of two [N, classes] logit arrays."""
    return {
        "n": int(len(reference)),
        "max_abs_diff": float(np.abs(reference - candidate).max()) if len(reference) else 0.0,
        "top1_agreement": float((reference.argmax(1) == candidate.argmax(1)).mean()) if len(reference) else 1.0,
    }


def held_out_images(data: str | Path | None, count: int, split_file: str | None, seed: int = 0) -> tuple[list, str]:
    """(`count` uint8 images, where they came from): validation images of `data` (all of its images
    without a split file), else seeded noise images where `data` is absent; ExportError for a data
    set that cannot be read."""
    from model.data import DataError, open_dataset

    if data is not None and Path(data).exists():
        try:
            images = open_dataset(data, split="val" if split_file else "all", val_split=split_file)
        except DataError as exc:
            raise ExportError(str(exc)) from None
        picks = np.sort(np.random.default_rng(seed).choice(len(images), size=min(count, len(images)), replace=False))
        return [images.images[i] for i in picks], f"{'validation images' if split_file else 'images'} of {Path(data).name}"
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(count)], NOISE


def verification_set(data: str | Path | None, count: int, split_file: str | None, seed: int = 0) -> tuple[np.ndarray, str]:
    """(a preprocessed float32 batch of held_out_images, where they came from)."""
    from model.preprocessing import preprocess_batch

    images, where = held_out_images(data, count, split_file, seed)
    return preprocess_batch(images), where


def verify_onnx(onnx_path, weights, batch: np.ndarray, arch: str = "alexnet_acmix", name=None) -> dict:
    """onnx.checker, then ONNX Runtime against Paddle on `batch`: within MAX_LOGIT_DIFF, same top-1.
    `name`: what errors call the file (a file not yet in place: the path it is for)."""
    import onnx

    from model.predict import load_weights, preprocessed_logits
    from model.runtime import import_paddle

    name = name or onnx_path
    if not Path(onnx_path).is_file():
        raise ExportError(f"{onnx_path}: no such ONNX file")
    try:
        onnx.checker.check_model(str(onnx_path), full_check=True)
    except Exception as exc:  # the checker raises several types
        raise ExportError(f"{name}: onnx.checker failed ({str(exc).splitlines()[0][:200]})") from None
    import_paddle()  # on the CPU with every core (model/runtime.py), before load_weights imports it
    try:
        model = load_weights(arch, str(weights))
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    expected = preprocessed_logits(model, batch)
    result = compare(expected, run_onnx(onnx_session(onnx_path), batch))
    if result["max_abs_diff"] > MAX_LOGIT_DIFF or result["top1_agreement"] < 1.0:
        raise ExportError(f"{name} disagrees with Paddle: max |logit diff| {result['max_abs_diff']:.2e}, "
                          f"top-1 agreement {result['top1_agreement']:.2%}")
    return result


def verify_derived(onnx_path, derived_path, precision: str, batch: np.ndarray) -> dict:
    """A derived (fp16, int8) ONNX against its fp32 ONNX in ONNX Runtime: top-1 agreement."""
    result = compare(run_onnx(onnx_session(onnx_path), batch), run_onnx(onnx_session(derived_path), batch))
    minimum = MIN_TOP1_AGREEMENT[precision]
    if result["top1_agreement"] < minimum:
        raise ExportError(f"{derived_path}: top-1 agreement with {onnx_path} {result['top1_agreement']:.2%} "
                          f"is below {minimum:.1%}")
    return result


def against_reference(artifact, onnx_path, precision: str, make_backend) -> tuple[dict, str]:
    """Run the reference images recorded beside the fp32 `onnx_path` through `make_backend(reference)`
    (a backend over `artifact`, not yet loaded) and compare them (runtime/reference.py: what the
    service checks at start); (the figures, where the images came from), or ExportError naming
    `artifact`."""
    from runtime.backend import BackendError
    from runtime.reference import ReferenceError, check, read_reference, reference_path

    try:
        reference = read_reference(reference_path(onnx_path))
        with make_backend(reference) as backend:
            return check(backend, reference, precision), reference.source
    except (BackendError, ReferenceError) as exc:
        raise ExportError(f"{artifact}: {exc}") from None


def verify_reference(derived_path, onnx_path, precision: str) -> dict | None:
    """A derived ONNX in ONNX Runtime against the reference logits (against_reference), or None where
    the fp32 `onnx_path` has no reference file beside it."""
    from runtime.onnxruntime import OnnxRuntimeBackend
    from runtime.reference import reference_path

    if not reference_path(onnx_path).is_file():
        return None
    result, source = against_reference(
        derived_path, onnx_path, precision,
        lambda reference: OnnxRuntimeBackend(derived_path, max_batch=len(reference.images)))
    return {**result, "source": source}


def verify_engine(engine_path, onnx_path, precision: str) -> dict:
    """A TensorRT engine, loaded with its own batch profile, against the reference logits
    (against_reference)."""
    from runtime.tensorrt import TensorRTBackend

    return against_reference(engine_path, onnx_path, precision, lambda reference: TensorRTBackend(engine_path))[0]
