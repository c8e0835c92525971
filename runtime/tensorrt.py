"""TensorRT backend: one deserialized engine, one execution context, one CUDA stream.

The name-based (v3) API of TensorRT 10 and 11: tensor addresses are bound by name once, the
input shape is set per batch, and `execute_async_v3` runs on our stream. Host buffers are
pinned (cudaMallocHost) so that the copies are real DMA transfers; all buffers are sized once
for `max_batch` rows. Device memory comes from cuda-python, as in NVIDIA's samples
(samples/python/common_runtime.py); tensorrt and cuda are imported in `_load` only.
"""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path

import numpy as np

from model.spec import INPUT_NAME, INPUT_SHAPE, NUM_CLASSES, OUTPUT_NAME
from runtime.backend import Backend, BackendError
from runtime.cuda import CudaError, cuda_call, import_cudart, stream_handle

ROW_SHAPES = {INPUT_NAME: INPUT_SHAPE, OUTPUT_NAME: (NUM_CLASSES,)}


class TensorRTBackend(Backend):
    name = "tensorrt"
    concurrent = False  # one execution context, one stream, one set of buffers

    def __init__(self, engine_path: str | Path, max_batch: int | None = None):
        """max_batch None: the largest batch of the engine's profile (known once loaded)."""
        super().__init__(max_batch or 0)
        self.engine_path = Path(engine_path)
        self._cudart = None
        self._runtime = self._engine = self._context = self._stream = None
        self._stream_handle = 0
        self._host: dict[str, np.ndarray] = {}  # tensor name -> numpy view of pinned memory
        self._pinned: list[int] = []  # cudaMallocHost pointers
        self._device: dict[str, int] = {}  # tensor name -> cudaMalloc pointer
        self._lock = threading.Lock()  # one batch at a time through the shared buffers

    def _load(self) -> None:
        try:
            import tensorrt as trt

            self._cudart = import_cudart()
        except (ImportError, OSError) as exc:
            raise BackendError(f"the TensorRT backend needs tensorrt and cuda-python with a CUDA GPU ({exc})") from None
        if not self.engine_path.is_file():
            raise BackendError(f"{self.engine_path}: no TensorRT engine file")
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        try:
            self._engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        except RuntimeError:  # some versions raise instead of returning None
            self._engine = None
        if self._engine is None:
            raise BackendError(f"{self.engine_path}: TensorRT cannot load it (built by another version or GPU?)")
        try:
            check_io(trt, self._engine)
            self._check_profile()
            self._context = self._engine.create_execution_context()
            if self._context is None:  # TensorRT logs why (e.g. device memory) and returns None
                raise BackendError(f"{self.engine_path}: TensorRT could not create an execution context (see its log)")
            self._allocate()
        except CudaError as exc:  # no driver for this CUDA, no device memory: one line, not a traceback
            self._close()
            raise BackendError(f"{self.engine_path}: CUDA could not set up the engine's buffers ({exc})") from None
        except Exception:
            self._close()
            raise
        self.description = f"{self.engine_path} (TensorRT {trt.__version__}, batch up to {self.max_batch})"

    def _check_profile(self) -> None:
        """The engine's profile must cover every batch the base class lets through, 1..max_batch."""
        low, _, high = (shape[0] for shape in self._engine.get_tensor_profile_shape(INPUT_NAME, 0))
        if not self.max_batch:
            self.max_batch = high
        if low > 1 or high < self.max_batch:
            raise BackendError(f"{self.engine_path} takes batches {low}..{high}, the service needs 1..{self.max_batch}; "
                               "rebuild the engine")

    def _allocate(self) -> None:
        """A stream, then pinned host and device buffers of max_batch rows per tensor, bound by name."""
        cudart = self._cudart
        self._stream = cuda_call(cudart.cudaStreamCreate())
        self._stream_handle = stream_handle(self._stream)
        for name, row in ROW_SHAPES.items():
            shape = (self.max_batch, *row)
            nbytes = int(np.prod(shape)) * 4  # float32
            pointer = cuda_call(cudart.cudaMallocHost(nbytes))
            self._pinned.append(pointer)
            self._host[name] = np.ctypeslib.as_array(ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), shape)
            self._device[name] = cuda_call(cudart.cudaMalloc(nbytes))
            if not self._context.set_tensor_address(name, int(self._device[name])):
                raise BackendError(f"TensorRT refused the buffer for {name!r}")

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        cudart, n = self._cudart, len(batch)
        with self._lock:
            if self._context is None:  # closed while this batch waited for the lock
                raise BackendError("the TensorRT backend was closed")
            host_in, host_out = self._host[INPUT_NAME], self._host[OUTPUT_NAME]
            host_in[:n] = batch
            if not self._context.set_input_shape(INPUT_NAME, batch.shape):
                raise BackendError(f"TensorRT rejected the input shape {list(batch.shape)}")
            cuda_call(cudart.cudaMemcpyAsync(self._device[INPUT_NAME], host_in.ctypes.data, batch.nbytes,
                                             cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self._stream))
            if not self._context.execute_async_v3(self._stream_handle):
                raise BackendError("TensorRT execute_async_v3 failed")
            out_bytes = n * NUM_CLASSES * 4
            cuda_call(cudart.cudaMemcpyAsync(host_out.ctypes.data, self._device[OUTPUT_NAME], out_bytes,
                                             cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self._stream))
            cuda_call(cudart.cudaStreamSynchronize(self._stream))
            return host_out[:n].copy()  # the pinned buffer is reused by the next batch

    def _close(self) -> None:
        """Once the batch in flight is done (the lock: Ray Serve may close a replica's backend while its
        executor still computes one), free every buffer and the stream (even after a failure), then
        drop context, engine, runtime."""
        with self._lock:
            self._free()

    def _free(self) -> None:
        cudart, errors = self._cudart, []
        if self._stream is not None:  # a failed batch may have left copies or a kernel queued
            try:
                cuda_call(cudart.cudaStreamSynchronize(self._stream))
            except RuntimeError as exc:
                errors.append(str(exc))
        frees = [(cudart.cudaFree, p) for p in self._device.values()] + [(cudart.cudaFreeHost, p) for p in self._pinned]
        if self._stream is not None:
            frees.append((cudart.cudaStreamDestroy, self._stream))
        for free, handle in frees:
            try:
                cuda_call(free(handle))
            except RuntimeError as exc:
                errors.append(str(exc))
        self._host, self._pinned, self._device, self._stream = {}, [], {}, None
        # The context uses the engine, which the runtime made: release them in that order.
        self._context = None
        self._engine = None
        self._runtime = None
        if errors:
            raise BackendError(f"freeing TensorRT buffers failed: {errors[0]}")


def check_io(trt, engine) -> None:
    """BackendError unless the engine's I/O is exactly float32 `image` [N, 3, 128, 128] -> `logits` [N, 10]."""
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    if sorted(names) != sorted(ROW_SHAPES):
        raise BackendError(f"engine tensors are {names}, expected {INPUT_NAME!r} and {OUTPUT_NAME!r}")
    modes = {INPUT_NAME: trt.TensorIOMode.INPUT, OUTPUT_NAME: trt.TensorIOMode.OUTPUT}
    for name, row in ROW_SHAPES.items():
        if engine.get_tensor_mode(name) != modes[name]:
            raise BackendError(f"engine tensor {name!r} is not an {modes[name].name.lower()}")
        if engine.get_tensor_dtype(name) != trt.float32:
            raise BackendError(f"engine tensor {name!r} is {engine.get_tensor_dtype(name)}, not float32")
        if tuple(engine.get_tensor_shape(name))[1:] != row:
            raise BackendError(f"engine tensor {name!r} has shape {tuple(engine.get_tensor_shape(name))}")
