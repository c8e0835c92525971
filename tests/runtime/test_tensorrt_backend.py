"""The TensorRT backend's load path where TensorRT refuses, with fakes of tensorrt and the CUDA
runtime (the unit's logic only; the real engine is tested by the gpu-marked tests)."""

from __future__ import annotations

import sys
import types

import pytest

from model.spec import INPUT_NAME, INPUT_SHAPE, NUM_CLASSES, OUTPUT_NAME
from runtime.backend import BackendError


class FakeEngine:
    """An engine with the service's I/O and a 1..8 profile whose execution context TensorRT could not make."""

    shapes = {INPUT_NAME: (-1, *INPUT_SHAPE), OUTPUT_NAME: (-1, NUM_CLASSES)}
    num_io_tensors = 2

    def get_tensor_name(self, i):
        return [INPUT_NAME, OUTPUT_NAME][i]

    def get_tensor_mode(self, name):
        return "input" if name == INPUT_NAME else "output"

    def get_tensor_dtype(self, name):
        return "float32"

    def get_tensor_shape(self, name):
        return self.shapes[name]

    def get_tensor_profile_shape(self, name, profile):
        return [(1, *INPUT_SHAPE), (8, *INPUT_SHAPE), (8, *INPUT_SHAPE)]

    def create_execution_context(self):
        return None  # what TensorRT returns when it cannot (device memory, say), having logged why


def fake_tensorrt() -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.0.0-fake"
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level=None: None})
    trt.Runtime = type("Runtime", (), {"__init__": lambda self, logger: None,
                                       "deserialize_cuda_engine": lambda self, data: FakeEngine()})
    trt.TensorIOMode = types.SimpleNamespace(INPUT="input", OUTPUT="output")
    trt.float32 = "float32"
    return trt


def test_an_execution_context_tensorrt_cannot_make_is_a_backend_error_and_nothing_is_kept(tmp_path, monkeypatch):
    import runtime.tensorrt as backend_module

    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt())
    monkeypatch.setattr(backend_module, "import_cudart", lambda: types.SimpleNamespace())
    engine = tmp_path / "m.plan"
    engine.write_bytes(b"an engine")
    backend = backend_module.TensorRTBackend(engine, max_batch=8)
    with pytest.raises(BackendError, match="could not create an execution context"):
        backend.load()
    assert backend._engine is None and backend._runtime is None and backend._stream is None
