"""The one backend interface: load, infer a float32 batch to logits, close.

Like Polygraphy's runners: input name, dtype and shape are checked once here, in the base, so
every backend gets a valid contiguous float32 [N, 3, 128, 128] batch with 1 <= N <= max_batch.
Heavy imports (onnxruntime, tensorrt, cuda) stay inside each backend's `load`.
"""

from __future__ import annotations

import abc

import numpy as np

from model.spec import INPUT_NAME, INPUT_SHAPE, NUM_CLASSES


class BackendError(RuntimeError):
    """A backend that cannot load or run; the message says why."""


class Backend(abc.ABC):
    """Subclasses set `name` and implement _load, _infer and _close."""

    name: str = "backend"
    # Whether infer may run in several threads at once (the batcher's inference workers).
    concurrent: bool = False

    def __init__(self, max_batch: int):
        self.max_batch = max_batch
        self.loaded = False
        self.description = ""  # what runs (file, device), for logs and /readyz

    def load(self) -> None:
        if not self.loaded:
            self._load()
            self.loaded = True

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """float32 [N, 3, 128, 128] -> float32 [N, 10] logits."""
        if not self.loaded:
            raise BackendError(f"{self.name} backend is not loaded")
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.ndim != 4 or batch.shape[1:] != INPUT_SHAPE:
            raise ValueError(f"{INPUT_NAME} must be [N, 3, 128, 128], got {list(batch.shape)}")
        if not 1 <= len(batch) <= self.max_batch:
            raise ValueError(f"batch of {len(batch)} is outside 1..{self.max_batch}")
        logits = self._infer(batch)
        if logits.shape != (len(batch), NUM_CLASSES):
            raise BackendError(f"{self.name} returned {list(logits.shape)} for a batch of {len(batch)}")
        return logits

    def close(self) -> None:
        if self.loaded:
            self._close()
            self.loaded = False

    def __enter__(self):
        self.load()
        return self

    def __exit__(self, *exc):
        self.close()

    @abc.abstractmethod
    def _load(self) -> None: ...

    @abc.abstractmethod
    def _infer(self, batch: np.ndarray) -> np.ndarray: ...

    @abc.abstractmethod
    def _close(self) -> None: ...
