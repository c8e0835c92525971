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


def test_closing_waits_for_the_batch_in_flight_and_a_batch_that_waited_for_it_is_refused():
    """Fakes of the CUDA runtime and the execution context (the unit's logic: the order of computing
    and freeing). Ray Serve closes a replica's backend while its executor may still compute a batch:
    the buffers were freed under it."""
    import threading
    import time

    import numpy as np

    from runtime.tensorrt import TensorRTBackend

    events, ok = [], (types.SimpleNamespace(value=0),)
    computing, finish = threading.Event(), threading.Event()

    class Context:
        def set_input_shape(self, name, shape):
            return True

        def execute_async_v3(self, stream):
            computing.set()
            finish.wait(5)
            events.append("computed")
            return True

    def freed(what):
        return lambda handle: events.append(f"{what} {handle}") or ok

    backend = TensorRTBackend("unused.plan", max_batch=2)
    backend._cudart = types.SimpleNamespace(
        cudaMemcpyKind=types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2),
        cudaMemcpyAsync=lambda *args: ok, cudaStreamSynchronize=lambda stream: ok,
        cudaFree=freed("cudaFree"), cudaFreeHost=freed("cudaFreeHost"), cudaStreamDestroy=freed("cudaStreamDestroy"))
    backend._context, backend._stream, backend._device = Context(), "stream", {INPUT_NAME: 1, OUTPUT_NAME: 2}
    backend._host = {INPUT_NAME: np.zeros((2, *INPUT_SHAPE), np.float32), OUTPUT_NAME: np.ones((2, NUM_CLASSES), np.float32)}
    backend.loaded = True

    class Lock:  # the backend's lock, noting who asks for it
        def __init__(self):
            self.lock, self.asked = threading.Lock(), []

        def __enter__(self):
            self.asked.append(threading.current_thread().name)
            self.lock.acquire()

        def __exit__(self, *exc):
            self.lock.release()

    backend._lock = Lock()
    results = []
    batch = threading.Thread(target=lambda: results.append(backend.infer(np.zeros((1, *INPUT_SHAPE), np.float32))))
    batch.start()
    assert computing.wait(5)
    closing = threading.Thread(target=backend.close, name="closing")
    closing.start()
    deadline = time.monotonic() + 5
    while "closing" not in backend._lock.asked and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "closing" in backend._lock.asked  # the close waits for the lock the batch holds
    assert events == []  # nothing freed under the batch
    finish.set()
    batch.join(5)
    closing.join(5)
    assert events == ["computed", "cudaFree 1", "cudaFree 2", "cudaStreamDestroy stream"]
    assert results[0].shape == (1, NUM_CLASSES)
    with pytest.raises(BackendError, match="the TensorRT backend was closed"):  # passed `loaded` before the close
        backend._infer(np.zeros((1, *INPUT_SHAPE), np.float32))
