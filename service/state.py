"""What the lifespan loads and the routers use: one object on app.state.service."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated

import numpy as np
from fastapi import Depends, HTTPException, Request
from PIL import Image

from model.preprocessing import load_rgb, open_image, preprocess
from service.backends.base import Backend
from service.batching import DynamicBatcher, QueueFullError, ShuttingDownError
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
        """One image through the batcher, with the service's HTTP errors for the ways it can fail."""
        if not self.ready or self.batcher is None:
            raise HTTPException(503, "the model is not ready", headers={"Retry-After": "1"})
        try:
            return await self.batcher.infer(image, deadline)
        except QueueFullError as exc:
            raise HTTPException(429, f"too many requests waiting: {exc}", headers={"Retry-After": "1"}) from None
        except ShuttingDownError as exc:
            raise HTTPException(503, str(exc)) from None
        except TimeoutError:
            raise HTTPException(504, f"no result within {self.settings.request_timeout_s:g} s") from None


def decode_opened(image: Image.Image) -> np.ndarray:
    return preprocess(load_rgb(image))


async def get_state(request: Request) -> ServiceState:
    # async: FastAPI runs sync dependencies in a worker thread, a thread hop per request.
    return request.app.state.service


StateDep = Annotated[ServiceState, Depends(get_state)]
