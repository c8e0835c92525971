"""What the lifespan loads and the routers use: one object on app.state.service."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated

import numpy as np
from fastapi import Depends, HTTPException, Request

from model.preprocessing import decode_image, preprocess
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
        """Image bytes to the network's input, in the decode threads; ImageError names the cause."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.decode_pool, decode_and_preprocess, data, self.settings.max_image_pixels)

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


def decode_and_preprocess(data: bytes, max_pixels: int) -> np.ndarray:
    return preprocess(decode_image(data, max_pixels=max_pixels))


async def get_state(request: Request) -> ServiceState:
    # async: FastAPI runs sync dependencies in a worker thread, a thread hop per request.
    return request.app.state.service


StateDep = Annotated[ServiceState, Depends(get_state)]
