"""ONNX Runtime backend: the exported ONNX on the CPU, or CUDA where ONNX Runtime has it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from model.spec import INPUT_NAME, OUTPUT_NAME
from service.backends.base import Backend, BackendError


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    concurrent = True  # InferenceSession.run is thread-safe

    def __init__(self, onnx_path: str | Path, max_batch: int, threads: int | None = None):
        super().__init__(max_batch)
        self.onnx_path = Path(onnx_path)
        self.threads = threads
        self.session = None

    def _load(self) -> None:
        import onnxruntime as ort

        if not self.onnx_path.is_file():
            raise BackendError(f"{self.onnx_path}: no such ONNX file")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if self.threads:
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
        # Idle intra-op threads spin by default, taking the cores that HTTP handling and image
        # decoding share with inference here; sleeping costs a little latency per batch only.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        try:
            self.session = ort.InferenceSession(str(self.onnx_path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BackendError(f"{self.onnx_path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0]})") from None
        inputs = {i.name: i.type for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        if inputs != {INPUT_NAME: "tensor(float)"} or OUTPUT_NAME not in outputs:
            raise BackendError(f"{self.onnx_path}: expected input {INPUT_NAME} float and output {OUTPUT_NAME}")
        self.description = f"{self.onnx_path} on {self.session.get_providers()[0]}"

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]

    def _close(self) -> None:
        self.session = None
