"""Backends behind one interface (base.Backend); `create_backend` picks one from the settings."""

from __future__ import annotations

import logging
import sys

from service.backends.base import Backend, BackendError

log = logging.getLogger("service")


def choose_backend(requested: str) -> tuple[str, str]:
    """(backend name, reason) for the `backend` setting."""
    if requested != "auto":
        return requested, f"set by ACMIX_BACKEND={requested}"
    from export.engine import tensorrt_status

    available, why = tensorrt_status()
    if available:
        return "tensorrt", "auto: a GPU and TensorRT are present"
    return "onnxruntime", f"auto: {why}"


def ensure_onnx(settings) -> None:
    """Export the shipped weights to ONNX when the ONNX file is missing or was exported from other
    weights (export.onnx_export.onnx_staleness), saying so."""
    from export.errors import ExportError
    from export.onnx_export import export_onnx, onnx_staleness

    why = onnx_staleness(settings.onnx_path, settings.weights_path)
    if why is None:
        return
    log.warning("%s: exporting it from %s", why, settings.weights_path)
    try:
        export_onnx(settings.weights_path, settings.onnx_path)
    except ExportError as exc:
        raise BackendError(f"cannot export the ONNX model: {exc}") from None
    print(f"exported {settings.onnx_path}", file=sys.stderr)


def create_backend(settings) -> tuple[Backend, str]:
    """The backend the settings ask for, not yet loaded, and why it was chosen."""
    name, reason = choose_backend(settings.backend)
    ensure_onnx(settings)
    if name == "onnxruntime":
        from service.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(settings.onnx_path, settings.max_batch_size, settings.intra_op_threads), reason
    from export.engine import ensure_engine
    from export.errors import ExportError
    from service.backends.tensorrt import TensorRTBackend

    try:
        engine, how = ensure_engine(
            settings.onnx_path,
            settings.engine_path,
            precision=settings.engine_precision,
            max_batch=max(settings.max_batch_size, 1),
            rebuild=settings.engine_rebuild,
        )
    except ExportError as exc:
        raise BackendError(f"TensorRT engine unusable: {exc}") from None
    return TensorRTBackend(engine, settings.max_batch_size), f"{reason}; engine {how}"
