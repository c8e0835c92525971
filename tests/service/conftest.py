"""An app over the real ONNX Runtime backend and a TestClient. The model is a tiny generated one with
the real contract (harness/tiny_model.py), with reference logits beside it, so that the service's
own behaviour is what these tests exercise and each starts in milliseconds; the real network is
covered by tests/export and tests/model."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from runtime.backend import Backend
from service.main import create_app
from service.settings import Settings
from tests.conftest import jpeg_bytes, synthetic_images


@pytest.fixture(scope="session")
def onnx_model(tmp_path_factory) -> Path:
    """For the service tests: the tiny model, and its reference logits computed by ONNX Runtime."""
    from tests.conftest import tiny_model_with_reference

    return tiny_model_with_reference(tmp_path_factory.mktemp("tiny"))


def service_settings(onnx_model, **overrides) -> Settings:
    values = {"backend": "onnxruntime", "onnx_path": str(onnx_model), "weights_path": "unused.pdparams",
              "max_batch_size": 8, "max_queue_delay_ms": 5.0, "decode_threads": 2, "intra_op_threads": 2,
              "grpc_port": 0}
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def make_client(onnx_model):
    """make_client(**settings, backend=None) -> a started TestClient; closed after the test."""
    clients = []

    def make(backend=None, **overrides):
        app = create_app(service_settings(onnx_model, **overrides), backend=backend)
        client = TestClient(app)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client):
    return make_client()


@pytest.fixture(scope="session")
def cifar_like_jpegs() -> list[bytes]:
    images, _ = synthetic_images(per_class=1, seed=3)
    return [jpeg_bytes(image) for image in images]


class SlowBackend(Backend):
    """A fake backend for batching logic (not the real model): logits are each image's mean in
    column 0, so a request can tell its own row; every call sleeps `delay` and is recorded, with
    the most calls ever in flight at once."""

    name = "fake"

    def __init__(self, max_batch: int = 8, delay: float = 0.0, fail: bool = False, concurrent: bool = False):
        super().__init__(max_batch)
        self.delay, self.fail, self.concurrent = delay, fail, concurrent
        self.calls: list[int] = []
        self.lock = threading.Lock()
        self.in_flight = self.most_in_flight = 0

    def _load(self):
        self.description = "fake"

    def _infer(self, batch):
        with self.lock:
            self.calls.append(len(batch))
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        time.sleep(self.delay)
        with self.lock:
            self.in_flight -= 1
        if self.fail:
            raise RuntimeError("backend exploded")
        logits = np.zeros((len(batch), 10), np.float32)
        logits[:, 0] = batch.mean(axis=(1, 2, 3))
        return logits

    def _close(self):
        pass
