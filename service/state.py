"""What the lifespan loads and the routers use: one object on app.state.service."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated

import numpy as np
from fastapi import Depends, Request
from PIL import Image

from model.preprocessing import load_rgb, open_image, preprocess
from runtime.backend import Backend
from service.batching import BatchObserver, DynamicBatcher, QueueFullError, ShuttingDownError
from service.errors import BadRequest, DeadlineExceeded, InferenceFailed, Overloaded, Unavailable
from service.metrics import Metrics
from service.settings import Settings
from service.statistics import Statistics
from service.workers import Peers

log = logging.getLogger("service")


@dataclass
class ServiceState(BatchObserver):
    settings: Settings
    metrics: Metrics
    statistics: Statistics = field(init=False)  # per model, Triton's statistics extension (in metrics' registry)
    backend: Backend | None = None
    backend_reason: str = ""
    batcher: DynamicBatcher | None = None
    decode_pool: ThreadPoolExecutor | None = None
    ready: bool = False
    draining: bool = False
    # SIGTERM with ACMIX_SHUTDOWN_DELAY_S: not ready, still serving, until the drain (service/__main__.py)
    stopping: bool = False
    startup_error: str | None = None
    started: float = field(default_factory=time.time)
    # Of the served artifact: the calibration temperature its ONNX records, and its sha256.
    temperature: float = 1.0
    model_digest: str = ""
    # Batches failed in a row, and the last failure: past settings.max_consecutive_failures the
    # service reports itself not ready and not live, so that an orchestrator restarts it.
    consecutive_failures: int = 0
    last_failure: str | None = None
    # The other server processes of this host, where there are (service/workers.py).
    peers: Peers = field(default_factory=Peers.from_env)

    def __post_init__(self):
        self.statistics = Statistics(self.metrics.registry)

    @property
    def failing(self) -> bool:
        limit = self.settings.max_consecutive_failures
        return (bool(limit) and self.consecutive_failures >= limit) or self.stuck_s() is not None

    def stuck_s(self) -> float | None:
        """How long a batch has been in the backend where that is more than twice the request timeout
        (every request in it has had its 504 long since: the backend hangs; a hung backend fails no
        batch, so the failure count never sees it), else None. Failing, like failed batches: not
        live, not ready, so that an orchestrator restarts the process."""
        seconds = self.batcher.in_backend.longest_s() if self.batcher is not None else 0.0
        return seconds if seconds > 2 * self.settings.request_timeout_s else None

    def is_ready(self) -> bool:
        return self.ready and not self.draining and not self.stopping and not self.failing and self.peers.all_ready()

    def not_ready_reason(self) -> str | None:
        if (stuck := self.stuck_s()) is not None:
            return (f"a batch has been in the backend for {stuck:.0f} s, more than twice ACMIX_REQUEST_TIMEOUT_S: "
                    "the backend hangs")
        if self.failing:
            return f"{self.consecutive_failures} batches failed in a row (last: {self.last_failure})"
        if self.startup_error or self.draining or not self.ready:
            return self.startup_error or ("draining" if self.draining else "loading")
        if self.stopping:
            return (f"stopping: requests still served for ACMIX_SHUTDOWN_DELAY_S "
                    f"({self.settings.shutdown_delay_s:g} s), then the drain")
        if not self.peers.all_ready():
            return f"waiting for the other server processes ({self.peers.count} in all) to be ready"
        return None

    # BatchObserver: metrics, statistics, and the failure count
    def queue_length(self, length: int) -> None:
        self.metrics.queue_length(length)

    def waiting_requests(self, by_tag: dict[str, int]) -> None:
        self.statistics.waiting_requests(by_tag)

    def batch_done(self, size: int, seconds: float, queue_waits: list[float]) -> None:
        self.consecutive_failures = 0
        self.metrics.batch_done(size, seconds, queue_waits)

    def batch_tags(self, images: dict[str, int], seconds: float) -> None:
        for model, count in images.items():
            self.statistics.executed(model, count, seconds)

    def batch_failed(self, size: int, error: Exception) -> None:
        self.consecutive_failures += 1
        self.last_failure = f"{type(error).__name__}: {error}"
        self.metrics.batch_failed(size, error)
        if self.failing and self.peers.count > 1 and not self.draining:
            # One of several server processes: nothing outside restarts it for failing liveness
            # (the orchestrator sees the others live), so it drains and exits, and the supervisor
            # (service/workers.py) starts another.
            log.error("%s; this worker exits so that the supervisor starts another", self.not_ready_reason())
            self.draining = True
            self.peers.mark_not_ready()
            os.kill(os.getpid(), signal.SIGTERM)

    @property
    def backend_name(self) -> str:
        return self.backend.name if self.backend else "none"

    def deadline(self, timeout_s: float | None = None) -> float:
        """When a request must be answered: after the client's own timeout where it gives one, never
        later than the server's limit (request_timeout_s)."""
        limit = self.settings.request_timeout_s
        if timeout_s is not None:
            if not timeout_s > 0:
                raise BadRequest(f"the request timeout must be positive, got {timeout_s:g} s")
            limit = min(limit, timeout_s)
        return time.perf_counter() + limit

    async def decode(self, data: bytes, deadline: float | None = None) -> np.ndarray:
        """Image bytes to the network's input; ImageError names the cause, DeadlineExceeded where
        `deadline` passed while the image waited for a decode thread (it is then not decoded).

        The header is read here. Small images (CIFAR's 32x32 and up to inline_decode_pixels)
        are decoded here too: a hop to the decode threads and back costs more CPU than their
        decoding (~0.3 ms with the resize). Larger ones are decoded in the threads.
        """
        image = open_image(data, self.settings.max_image_pixels)
        if image.width * image.height <= self.settings.inline_decode_pixels:
            return decode_opened(image)
        loop = asyncio.get_running_loop()
        decoded = await loop.run_in_executor(self.decode_pool, decode_opened, image, deadline)
        if decoded is None:
            raise DeadlineExceeded("no result before the request's deadline (still waiting to be decoded)")
        return decoded

    async def logits(self, images: list[np.ndarray], deadline: float, model: str | None = None) -> np.ndarray:
        """Logits [N, 10] of one request's images through the batcher (all queued or none; their
        batches counted for `model`); the service's domain errors for the ways it can fail."""
        if not self.ready or self.batcher is None:
            raise Unavailable("the model is not ready", retry_after=1)
        try:
            return np.stack(await self.batcher.infer_many(images, deadline, model)).astype(np.float32, copy=False)
        except QueueFullError as exc:
            raise Overloaded(f"too many requests waiting: {exc}", retry_after=self.batcher.retry_after()) from None
        except ShuttingDownError as exc:
            raise Unavailable(str(exc)) from None
        except TimeoutError:
            raise DeadlineExceeded("no result before the request's deadline") from None
        except Exception as exc:  # the backend failed on this request's batch
            raise InferenceFailed(f"inference failed: {exc}") from None


def decode_opened(image: Image.Image, deadline: float | None = None) -> np.ndarray | None:
    """The opened image decoded and preprocessed; None, undecoded, where `deadline` has passed."""
    if deadline is not None and time.perf_counter() >= deadline:
        return None
    return preprocess(load_rgb(image))


async def get_state(request: Request) -> ServiceState:
    # async: FastAPI runs sync dependencies in a worker thread, a thread hop per request.
    return request.app.state.service


StateDep = Annotated[ServiceState, Depends(get_state)]
