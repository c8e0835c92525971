"""Dynamic batching: one bounded queue, batches cut by size or by the oldest request's wait.

Requests (one preprocessed image each) wait in a queue; a batch goes to the backend when it
holds max_batch images or its oldest has waited max_delay. Inference runs off the event loop in
`workers` threads, one batch each: with two, one batch computes while the replies of the last
one go out and the next one fills, so the cores do not idle between batches (a backend that
cannot run concurrently, such as TensorRT's one context and stream, gets one). Each request's
future gets exactly its own row of logits. A request whose deadline passes while queued is
dropped before inference and answered 504 by its handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from runtime.backend import Backend
from service.request_log import record_batch


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
    queue_s: float = 0.0
    infer_s: float = 0.0
    siblings: list[_Request] = field(default_factory=list)  # the other images of its request
    tag: str | None = None  # what the caller counts its batches by (service/statistics.py: the model)


class BatchObserver:
    """Hooks for metrics and statistics; the default does nothing."""

    def queue_length(self, length: int) -> None: ...

    def waiting_requests(self, by_tag: dict[str, int]) -> None:
        """How many requests of each tag have images in the queue (a request of several images counts once)."""

    def batch_done(self, size: int, seconds: float, queue_waits: list[float]) -> None: ...

    def batch_tags(self, images: dict[str, int], seconds: float) -> None:
        """A computed batch's images by their requests' tag (those with one), and its backend time."""

    def batch_failed(self, size: int, error: Exception) -> None: ...


class InBackend:
    """The batches in the backend and when each went in, for every batcher (this module's, and Ray
    Serve's in service/ray_app.py). A backend that never returns fails no batch: only how long one
    has been there shows it (ServiceState.stuck_s)."""

    def __init__(self):
        self._since: dict[object, float] = {}

    @contextlib.contextmanager
    def batch(self, started: float):
        """The block computing a batch that went into the backend at `started` (time.perf_counter)."""
        key = object()
        self._since[key] = started
        try:
            yield
        finally:
            del self._since[key]

    def longest_s(self) -> float:
        """How long the batch in the backend longest has been there; 0 where none is."""
        return time.perf_counter() - min(self._since.values()) if self._since else 0.0


class DynamicBatcher:
    def __init__(
        self,
        backend: Backend,
        max_batch: int,
        max_delay_s: float,
        max_queue: int,
        observer: BatchObserver | None = None,
        workers: int = 1,
    ):
        self.backend = backend
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self.observer = observer or BatchObserver()
        self._queue: deque[_Request] = deque()
        # Requests with images in the queue, by tag, and each such request's images there (by the id of
        # its siblings list): kept as images come and go, not counted over the queue at every change.
        self._waiting: Counter[str] = Counter()
        self._queued_images: dict[int, int] = {}
        self.in_backend = InBackend()
        self._wakeup = asyncio.Event()
        self.workers = workers if backend.concurrent else 1
        self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="inference")
        self._tasks: list[asyncio.Task] = []
        self._closing = False
        self._drain_rate = 0.0  # images per second the workers finish while busy (moving average)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._run(), name=f"batcher-{i}") for i in range(self.workers)]

    def __len__(self) -> int:
        return len(self._queue)

    def retry_after(self) -> float:
        """Seconds until the queue, as long as it is now, is drained at the measured rate (1 s when
        there is no measure yet), for a 429's Retry-After."""
        if self._drain_rate <= 0:
            return 1.0
        return min(max(len(self._queue) / self._drain_rate, 1.0), 60.0)

    def _note_drained(self, images: int, seconds: float) -> None:
        rate = self.workers * images / max(seconds, 1e-6)
        self._drain_rate = rate if self._drain_rate == 0 else 0.8 * self._drain_rate + 0.2 * rate

    async def infer(self, image: np.ndarray, deadline: float) -> np.ndarray:
        """Logits for one preprocessed image; raises QueueFullError, ShuttingDownError, TimeoutError."""
        return (await self.infer_many([image], deadline))[0]

    async def infer_many(self, images: list[np.ndarray], deadline: float, tag: str | None = None) -> list[np.ndarray]:
        """Logits for the images of one request, in order: all of them are queued or none
        (QueueFullError when they do not all fit), and when one fails or the deadline passes, the
        others still queued are dropped before inference. Raises QueueFullError, ShuttingDownError,
        TimeoutError, or the backend's error."""
        if self._closing:
            raise ShuttingDownError("the service is shutting down")
        if len(self._queue) + len(images) > self.max_queue:
            raise QueueFullError(f"{len(self._queue)} requests are already waiting"
                                 + (f"; {len(images)} more do not fit in {self.max_queue}" if len(images) > 1 else ""))
        loop = asyncio.get_running_loop()
        requests = [_Request(image, deadline, loop.create_future(), tag=tag) for image in images]
        for request in requests:
            request.siblings = requests
        self._queue.extend(requests)
        if tag is not None:
            self._waiting[tag] += 1
            self._queued_images[id(requests)] = len(requests)
        self._queue_changed()
        self._wakeup.set()
        try:
            async with asyncio.timeout(max(deadline - time.perf_counter(), 0)):
                rows = await asyncio.gather(*(request.future for request in requests))
        except TimeoutError:
            raise TimeoutError("no result before the request deadline") from None
        finally:
            for request in requests:
                request.future.cancel()
            if any(request.future.cancelled() for request in requests):
                self._forget_cancelled()  # now, not when a batch is cut: the queue's limit and Retry-After count them
        for request in requests:
            record_batch(request.queue_s, request.infer_s)
        return rows

    def _queue_changed(self) -> None:
        self.observer.queue_length(len(self._queue))
        self.observer.waiting_requests(+self._waiting)

    def _left_queue(self, request: _Request) -> None:
        """`request`'s image is out of the queue: its request no longer waits once none of its images does."""
        if request.tag is None:
            return
        key = id(request.siblings)
        self._queued_images[key] -= 1
        if not self._queued_images[key]:
            del self._queued_images[key]
            self._waiting[request.tag] -= 1

    def _forget_cancelled(self) -> None:
        """Drop from the queue the requests whose caller gave up (deadline passed, client gone, a
        sibling failed); at most max_queue to look at."""
        live = [request for request in self._queue if not request.future.cancelled()]
        if len(live) != len(self._queue):
            for request in self._queue:
                if request.future.cancelled():
                    self._left_queue(request)
            self._queue.clear()
            self._queue.extend(live)
            self._queue_changed()

    async def close(self) -> None:
        """Take no new requests, finish the queued ones, stop the workers."""
        self._closing = True
        self._wakeup.set()
        await asyncio.gather(*self._tasks)
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
                with self.in_backend.batch(started):  # left before a failure is counted (a failure is not a hang)
                    logits = await loop.run_in_executor(self._executor, self._infer, [r.image for r in batch])
            except Exception as exc:  # a failing backend fails this batch's requests, not the loop
                self.observer.batch_failed(len(batch), exc)
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(exc)
                    for sibling in request.siblings:  # its request has failed: the rest is not computed
                        sibling.future.cancel()
                continue
            seconds = time.perf_counter() - started
            self._note_drained(len(batch), seconds)
            self.observer.batch_done(len(batch), seconds, waits)
            tags = Counter(r.tag for r in batch if r.tag is not None)
            if tags:
                self.observer.batch_tags(tags, seconds)
            for request, row, wait in zip(batch, logits, waits, strict=True):
                if not request.future.done():
                    request.queue_s, request.infer_s = wait, seconds
                    request.future.set_result(row)

    def _infer(self, images: list[np.ndarray]) -> np.ndarray:
        # In the worker thread: stacking a batch is a copy the event loop need not make.
        return self.backend.infer(np.stack(images))

    async def _wait_for_batch(self) -> None:
        """Until the queue holds a full batch, the oldest has waited max_delay, or we are closing
        (or another worker took the queue meanwhile)."""
        while self._queue and len(self._queue) < self.max_batch and not self._closing:
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
            self._left_queue(request)
            if request.future.done() or request.deadline <= now:
                continue  # timed out or cancelled while queued: not worth computing
            batch.append(request)
        self._queue_changed()
        return batch
