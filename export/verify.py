"""ONNX Runtime against Paddle on real images, and onnx.checker."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from export.errors import ExportError
from model.spec import INPUT_NAME, OUTPUT_NAME

MAX_LOGIT_DIFF = 1e-4
# Top-1 agreement with ONNX Runtime's fp32 model that an engine (or fp16 ONNX) must reach.
MIN_TOP1_AGREEMENT = {"fp32": 0.999, "fp16": 0.995}


def onnx_session(path: str | Path, providers: list[str] | None = None):
    """An ONNX Runtime session for a model file; ExportError naming the file if it is unusable."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such ONNX file")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types per failure
        raise ExportError(f"{path}: not a loadable ONNX model ({str(exc).splitlines()[0][:200]})") from None


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


def verification_images(data: str | Path | None, count: int, split_file: str | None, seed: int = 0) -> np.ndarray:
    """A preprocessed float32 batch: `count` validation images from `data`, else seeded noise images."""
    from model.data import DataError, open_dataset
    from model.preprocessing import preprocess_batch

    if data is not None and Path(data).exists():
        try:
            images = open_dataset(data, split="val" if split_file else "all", val_split=split_file)
        except DataError as exc:
            raise ExportError(str(exc)) from None
        picks = np.random.default_rng(seed).choice(len(images), size=min(count, len(images)), replace=False)
        return preprocess_batch([images.images[i] for i in np.sort(picks)])
    rng = np.random.default_rng(seed)
    return preprocess_batch([rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(count)])


def verify_onnx(onnx_path, weights, batch: np.ndarray, arch: str = "alexnet_acmix") -> dict:
    """onnx.checker, then ONNX Runtime against Paddle on `batch`; ExportError past the tolerances."""
    import onnx

    from model.predict import load_weights
    from model.runtime import import_paddle

    try:
        onnx.checker.check_model(str(onnx_path), full_check=True)
    except Exception as exc:  # the checker raises several types
        raise ExportError(f"{onnx_path}: onnx.checker failed ({str(exc).splitlines()[0][:200]})") from None
    paddle = import_paddle()
    try:
        model = load_weights(arch, str(weights))
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    with paddle.no_grad():
        expected = np.concatenate(
            [model(paddle.to_tensor(batch[i : i + 64])).numpy() for i in range(0, len(batch), 64)]
        )
    result = compare(expected, run_onnx(onnx_session(onnx_path), batch))
    result["passed"] = result["max_abs_diff"] <= MAX_LOGIT_DIFF and result["top1_agreement"] == 1.0
    return result


def verify_fp16(onnx_path, batch: np.ndarray) -> dict:
    """The fp16 ONNX (what an fp16 engine is built from) against the fp32 one, in ONNX Runtime."""
    from export.fp16 import convert_fp16, fp16_onnx_path

    half = convert_fp16(onnx_path, fp16_onnx_path(onnx_path))
    result = compare(run_onnx(onnx_session(onnx_path), batch), run_onnx(onnx_session(half), batch))
    return _report(f"{half}: ONNX Runtime fp16 vs fp32", result, MIN_TOP1_AGREEMENT["fp16"])


def verify_engine(engine_path, onnx_path, precision: str, batch: np.ndarray) -> dict:
    """A TensorRT engine against ONNX Runtime's fp32 model on `batch` (GPU host)."""
    from service.backends.tensorrt import TensorRTBackend

    with TensorRTBackend(engine_path, max_batch=64) as engine:
        logits = np.concatenate([engine.infer(batch[i : i + 64]) for i in range(0, len(batch), 64)])
    result = compare(run_onnx(onnx_session(onnx_path), batch), logits)
    return _report(f"{engine_path}: TensorRT {precision} vs ONNX Runtime", result, MIN_TOP1_AGREEMENT[precision])


def _report(what: str, result: dict, minimum: float) -> dict:
    print(
        f"verify {what} on {result['n']} images: max |logit diff| {result['max_abs_diff']:.2e}, "
        f"top-1 agreement {result['top1_agreement']:.2%} (needs {minimum:.1%})",
        file=sys.stderr,
    )
    result["passed"] = result["top1_agreement"] >= minimum
    if not result["passed"]:
        raise ExportError(f"{what}: top-1 agreement {result['top1_agreement']:.2%} is below {minimum:.1%}")
    return result
