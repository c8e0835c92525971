"""Dynamic batching: one bounded queue, batches cut by size or by the oldest request's wait.

Requests (one preprocessed image each) wait in a queue; a batch goes to the backend when it
holds max_batch images or its oldest has waited max_delay. The backend runs in one worker
thread, off the event loop, one batch at a time (it uses every core itself); the next batch fills
meanwhile. Each request's future gets exactly its own row of logits. A request whose deadline
passes while queued is dropped before inference and answered 504 by its handler.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from service.backends.base import Backend


class QueueFullError(Exception):
    """The queue holds max_queue requests; the caller should retry later (429)."""


class ShuttingDownError(Exception):
    """The service is draining and takes no new requests (503)."""


@dataclass
class _Request:
    image: np.ndarray
    deadline: float
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class BatchObserver:
    """Hooks for metrics; the default does nothing."""

    def queue_length(self, length: int) -> None: ...

    def batch_done(self, size: int, seconds: float, queue_waits: list[float]) -> None: ...


class DynamicBatcher:
    def __init__(
        self,
        backend: Backend,
        max_batch: int,
        max_delay_s: float,
        max_queue: int,
        observer: BatchObserver | None = None,
    ):
        self.backend = backend
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self.observer = observer or BatchObserver()
        self._queue: deque[_Request] = deque()
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._task: asyncio.Task | None = None
        self._closing = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    def __len__(self) -> int:
        return len(self._queue)

    async def infer(self, image: np.ndarray, deadline: float) -> np.ndarray:
        """Logits for one preprocessed image; raises QueueFullError, ShuttingDownError, TimeoutError."""
        if self._closing:
            raise ShuttingDownError("the service is shutting down")
        if len(self._queue) >= self.max_queue:
            raise QueueFullError(f"{len(self._queue)} requests are already waiting")
        request = _Request(image, deadline, asyncio.get_running_loop().create_future())
        self._queue.append(request)
        self.observer.queue_length(len(self._queue))
        self._wakeup.set()
        try:
            async with asyncio.timeout(max(deadline - time.perf_counter(), 0)):
                return await request.future  # a timeout cancels the future: the batch skips it
        except TimeoutError:
            raise TimeoutError("no result before the request deadline") from None

    async def close(self) -> None:
        """Take no new requests, finish the queued ones, stop the worker."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._wait_for_batch()
            batch = self._take_batch()
            if not batch:
                continue
            started = time.perf_counter()
            waits = [started - r.enqueued for r in batch]
            try:
                logits = await loop.run_in_executor(
                    self._executor, self.backend.infer, np.stack([r.image for r in batch])
                )
            except Exception as exc:  # a failing backend fails this batch's requests, not the loop
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(exc)
                continue
            self.observer.batch_done(len(batch), time.perf_counter() - started, waits)
            for request, row in zip(batch, logits, strict=True):
                if not request.future.done():
                    request.future.set_result(row)

    async def _wait_for_batch(self) -> None:
        """Until the queue holds a full batch, the oldest has waited max_delay, or we are closing."""
        while len(self._queue) < self.max_batch and not self._closing:
            remaining = self._queue[0].enqueued + self.max_delay_s - time.perf_counter()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    def _take_batch(self) -> list[_Request]:
        batch = []
        now = time.perf_counter()
        while self._queue and len(batch) < self.max_batch:
            request = self._queue.popleft()
            if request.future.done() or request.deadline <= now:
                continue  # timed out or cancelled while queued: not worth computing
            batch.append(request)
        self.observer.queue_length(len(self._queue))
        return batch
