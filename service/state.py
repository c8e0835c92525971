"""What the lifespan loads and the routers use: one object on app.state.service."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated

import numpy as np
from fastapi import Depends, Request
from PIL import Image

from model.preprocessing import load_rgb, open_image, preprocess
from runtime.backend import Backend
from service.batching import DynamicBatcher, QueueFullError, ShuttingDownError
from service.errors import DeadlineExceeded, InferenceFailed, Overloaded, Unavailable
from service.metrics import Metrics
from service.settings import Settings


@dataclass
class ServiceState:
    settings: Settings
    metrics: Metrics
    backend: Backend | None = None
    backend_reason: str = ""
    batcher: DynamicBatcher | None = None
    decode_pool: ThreadPoolExecutor | None = None
    ready: bool = False
    draining: bool = False
    load_error: str | None = None
    started: float = field(default_factory=time.time)
    # Of the served artifact: the calibration temperature its ONNX records, and its sha256.
    temperature: float = 1.0
    model_digest: str = ""

    @property
    def backend_name(self) -> str:
        return self.backend.name if self.backend else "none"

    def deadline(self) -> float:
        return time.perf_counter() + self.settings.request_timeout_s

    async def decode(self, data: bytes) -> np.ndarray:
        """Image bytes to the network's input; ImageError names the cause.

        The header is read here. Small images (CIFAR's 32x32 and up to inline_decode_pixels)
        are decoded here too: a hop to the decode threads and back costs more CPU than their
        decoding (~0.3 ms with the resize). Larger ones are decoded in the threads.
        """
        image = open_image(data, self.settings.max_image_pixels)
        if image.width * image.height <= self.settings.inline_decode_pixels:
            return decode_opened(image)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.decode_pool, decode_opened, image)

    async def logits(self, image: np.ndarray, deadline: float) -> np.ndarray:
        """One image through the batcher; the service's domain errors for the ways it can fail."""
        if not self.ready or self.batcher is None:
            raise Unavailable("the model is not ready", retry_after=1)
        try:
            return await self.batcher.infer(image, deadline)
        except QueueFullError as exc:
            raise Overloaded(f"too many requests waiting: {exc}", retry_after=1) from None
        except ShuttingDownError as exc:
            raise Unavailable(str(exc)) from None
        except TimeoutError:
            raise DeadlineExceeded(f"no result within {self.settings.request_timeout_s:g} s") from None
        except Exception as exc:  # the backend failed on this request's batch
            raise InferenceFailed(f"inference failed: {exc}") from None


def decode_opened(image: Image.Image) -> np.ndarray:
    return preprocess(load_rgb(image))


async def get_state(request: Request) -> ServiceState:
    # async: FastAPI runs sync dependencies in a worker thread, a thread hop per request.
    return request.app.state.service


StateDep = Annotated[ServiceState, Depends(get_state)]
