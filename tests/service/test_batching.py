"""The dynamic batcher's logic, with a fake backend (the real one is covered in test_api)."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from service.batching import DynamicBatcher, QueueFullError, ShuttingDownError
from tests.service.conftest import SlowBackend


def image(value: float) -> np.ndarray:
    return np.full((3, 128, 128), value, np.float32)


def run(coro):
    return asyncio.run(coro)


async def started(backend, **kwargs) -> DynamicBatcher:
    backend.load()
    options = {"max_batch": 8, "max_delay_s": 0.02, "max_queue": 100}
    options.update(kwargs)
    batcher = DynamicBatcher(backend, **options)
    batcher.start()
    return batcher


def test_each_request_gets_its_own_row_and_batches_form():
    async def main():
        backend = SlowBackend(delay=0.01)
        batcher = await started(backend)
        deadline = time.perf_counter() + 5
        results = await asyncio.gather(*(batcher.infer(image(i), deadline) for i in range(20)))
        await batcher.close()
        return backend, results

    backend, results = run(main())
    assert [float(r[0]) for r in results] == [float(i) for i in range(20)]
    assert sum(backend.calls) == 20 and max(backend.calls) == 8 and len(backend.calls) <= 4


def test_a_lone_request_waits_at_most_the_queue_delay():
    async def main():
        backend = SlowBackend()
        batcher = await started(backend, max_delay_s=0.05)
        begin = time.perf_counter()
        await batcher.infer(image(1), time.perf_counter() + 5)
        elapsed = time.perf_counter() - begin
        await batcher.close()
        return backend, elapsed

    backend, elapsed = run(main())
    assert backend.calls == [1] and 0.04 <= elapsed < 0.5


def test_full_queue_is_refused():
    async def main():
        backend = SlowBackend(max_batch=1, delay=0.2)
        batcher = await started(backend, max_batch=1, max_queue=2)
        deadline = time.perf_counter() + 5
        first = asyncio.ensure_future(batcher.infer(image(0), deadline))
        await asyncio.sleep(0.05)  # the first is now in the backend
        queued = [asyncio.ensure_future(batcher.infer(image(i), deadline)) for i in (1, 2)]
        await asyncio.sleep(0)
        with pytest.raises(QueueFullError):
            await batcher.infer(image(3), deadline)
        results = await asyncio.gather(first, *queued)
        await batcher.close()
        return results

    assert [float(r[0]) for r in run(main())] == [0.0, 1.0, 2.0]


def test_a_request_of_several_images_is_queued_whole_or_not_at_all():
    """Room for two of three: none is queued (none computed), and the queue keeps what it held."""
    async def main():
        backend = SlowBackend(max_batch=1, delay=0.2)
        batcher = await started(backend, max_batch=1, max_queue=3)
        deadline = time.perf_counter() + 5
        first = asyncio.ensure_future(batcher.infer(image(0), deadline))
        await asyncio.sleep(0.05)  # the first is now in the backend
        queued = asyncio.ensure_future(batcher.infer(image(1), deadline))
        await asyncio.sleep(0)
        with pytest.raises(QueueFullError, match="3 more do not fit in 3"):
            await batcher.infer_many([image(i) for i in (7, 8, 9)], deadline)
        assert len(batcher) == 1
        both = await batcher.infer_many([image(5), image(6)], deadline)  # these fit
        results = await asyncio.gather(first, queued)
        await batcher.close()
        return backend, results, both

    backend, results, both = run(main())
    assert [float(r[0]) for r in results] == [0.0, 1.0] and [float(r[0]) for r in both] == [5.0, 6.0]
    assert sum(backend.calls) == 4  # 7, 8 and 9 never reached the backend


def test_when_one_image_of_a_request_fails_its_others_still_queued_are_dropped():
    async def main():
        backend = SlowBackend(max_batch=1, delay=0.05, fail=True)
        batcher = await started(backend, max_batch=1)
        with pytest.raises(RuntimeError, match="exploded"):
            await batcher.infer_many([image(i) for i in range(4)], time.perf_counter() + 5)
        await asyncio.sleep(0.2)  # time for three more batches, were they computed
        await batcher.close()
        return backend

    assert run(main()).calls == [1]


def test_deadline_passes_while_queued():
    async def main():
        backend = SlowBackend(max_batch=1, delay=0.3)
        batcher = await started(backend, max_batch=1)
        slow = asyncio.ensure_future(batcher.infer(image(0), time.perf_counter() + 5))
        await asyncio.sleep(0.05)
        with pytest.raises(TimeoutError):
            await batcher.infer(image(1), time.perf_counter() + 0.1)
        await slow
        await batcher.close()
        return backend

    assert run(main()).calls == [1]  # the expired request was never computed


def test_requests_given_up_leave_the_queue_at_once_and_their_room_is_taken():
    """They stayed until a batch was cut, counted against the queue's limit: while the backend was
    busy, a timed-out client's images turned the next clients away with 429s."""
    async def main():
        backend = SlowBackend(max_batch=1, delay=0.4)
        batcher = await started(backend, max_batch=1, max_queue=3)
        busy = asyncio.ensure_future(batcher.infer(image(0), time.perf_counter() + 5))
        await asyncio.sleep(0.05)  # in the backend
        with pytest.raises(TimeoutError):
            await batcher.infer_many([image(i) for i in (1, 2, 3)], time.perf_counter() + 0.1)
        assert len(batcher) == 0
        gone = asyncio.ensure_future(batcher.infer(image(4), time.perf_counter() + 5))
        await asyncio.sleep(0)
        gone.cancel()  # the client went away
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert len(batcher) == 0
        rows = await batcher.infer_many([image(i) for i in (5, 6, 7)], time.perf_counter() + 5)  # room for all
        await busy
        await batcher.close()
        return backend, rows

    backend, rows = run(main())
    assert [float(r[0]) for r in rows] == [5.0, 6.0, 7.0] and backend.calls == [1, 1, 1, 1]


def test_backend_failure_fails_that_batch_only():
    async def main():
        backend = SlowBackend(fail=True)
        batcher = await started(backend)
        with pytest.raises(RuntimeError, match="exploded"):
            await batcher.infer(image(0), time.perf_counter() + 5)
        backend.fail = False
        result = await batcher.infer(image(4), time.perf_counter() + 5)
        await batcher.close()
        return result

    assert float(run(main())[0]) == 4.0


@pytest.mark.parametrize("workers", [1, 2])
def test_close_drains_queued_requests_then_refuses(workers):
    async def main():
        backend = SlowBackend(max_batch=2, delay=0.05, concurrent=True)
        batcher = await started(backend, max_batch=2, workers=workers)
        deadline = time.perf_counter() + 5
        pending = [asyncio.ensure_future(batcher.infer(image(i), deadline)) for i in range(6)]
        await asyncio.sleep(0)
        await batcher.close()
        with pytest.raises(ShuttingDownError):
            await batcher.infer(image(9), deadline)
        return [float(r[0]) for r in await asyncio.gather(*pending)]

    assert run(main()) == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


def test_two_workers_compute_two_batches_at_once():
    async def main():
        backend = SlowBackend(max_batch=4, delay=0.1, concurrent=True)
        batcher = await started(backend, max_batch=4, workers=2)
        deadline = time.perf_counter() + 5
        results = await asyncio.gather(*(batcher.infer(image(i), deadline) for i in range(16)))
        await batcher.close()
        return backend, results

    backend, results = run(main())
    assert [float(r[0]) for r in results] == [float(i) for i in range(16)]
    assert sum(backend.calls) == 16 and backend.most_in_flight == 2


def test_a_backend_that_cannot_run_concurrently_gets_one_worker():
    async def main():
        backend = SlowBackend(max_batch=4, delay=0.05)  # like TensorRT's one context and stream
        batcher = await started(backend, max_batch=4, workers=2)
        deadline = time.perf_counter() + 5
        await asyncio.gather(*(batcher.infer(image(i), deadline) for i in range(16)))
        await batcher.close()
        return backend, batcher

    backend, batcher = run(main())
    assert batcher.workers == 1 and backend.most_in_flight == 1 and sum(backend.calls) == 16


def test_two_workers_share_a_trickling_queue():
    # Both workers wait on a partial batch; whichever cuts it, the other must find the queue
    # empty and wait again, not fail.
    async def main():
        backend = SlowBackend(max_batch=4, delay=0.03, concurrent=True)
        batcher = await started(backend, max_batch=4, max_delay_s=0.02, workers=2)
        deadline = time.perf_counter() + 5
        pending = []
        for i in range(24):
            pending.append(asyncio.ensure_future(batcher.infer(image(i), deadline)))
            await asyncio.sleep(0.004)
        results = await asyncio.gather(*pending)
        await batcher.close()
        return backend, results

    backend, results = run(main())
    assert [float(r[0]) for r in results] == [float(i) for i in range(24)] and sum(backend.calls) == 24


def test_retry_after_is_the_queue_over_the_measured_drain_rate():
    async def main():
        # A fake backend taking 0.1 s per batch of up to 2 images: it drains at most 20 images a second.
        batcher = await started(SlowBackend(max_batch=2, delay=0.1), max_batch=2, max_delay_s=0.0)
        assert batcher.retry_after() == 1.0  # nothing measured yet
        deadline = time.perf_counter() + 30
        started_at = time.perf_counter()
        first = [asyncio.ensure_future(batcher.infer(image(i), deadline)) for i in range(4)]
        await asyncio.gather(*first)
        wall_rate = 4 / (time.perf_counter() - started_at)  # what this (possibly loaded) machine managed
        waiting = [asyncio.ensure_future(batcher.infer(image(i), deadline)) for i in range(100)]
        await asyncio.sleep(0)  # all 100 queued
        estimate = batcher.retry_after()
        await asyncio.gather(*waiting)
        await batcher.close()
        return estimate, wall_rate

    estimate, wall_rate = run(main())
    # ~98 queued: no faster than the fake's 20 images/s allows; no slower than the wall clock saw,
    # within the moving average's weight on the first, slowest batch.
    assert 98 / 20 * 0.9 <= estimate <= 1.5 * 100 / wall_rate


class Walks(list):
    """A deque stand-in that counts how often the whole queue is walked."""

    def __init__(self):
        super().__init__()
        self.walks = 0

    def __iter__(self):
        self.walks += 1
        return super().__iter__()

    def popleft(self):
        return self.pop(0)


def test_requests_waiting_by_tag_count_each_request_once_and_follow_the_queue_without_walking_it():
    """Triton's pending count (service/statistics.py): a request of several images counts once while
    any of them waits; the counts change with each image in and out, the queue never walked for them
    (it was, at every request and every batch: O(queue) on the event loop, a full queue the costliest)."""
    from service.batching import BatchObserver

    class Seen(BatchObserver):
        def __init__(self):
            self.counts = []

        def waiting_requests(self, by_tag):
            self.counts.append(dict(by_tag))

    async def main():
        backend = SlowBackend(max_batch=2, delay=0.2)
        seen = Seen()
        batcher = await started(backend, max_batch=2, max_delay_s=0.0, observer=seen)
        batcher._queue = walked = Walks()
        deadline = time.perf_counter() + 5
        busy = asyncio.ensure_future(batcher.infer_many([image(0), image(1)], deadline, "a"))
        await asyncio.sleep(0.05)  # both in the backend, none waiting
        three = asyncio.ensure_future(batcher.infer_many([image(i) for i in (2, 3, 4)], deadline, "a"))
        one = asyncio.ensure_future(batcher.infer_many([image(5)], deadline, "b"))
        untagged = asyncio.ensure_future(batcher.infer(image(6), deadline))
        await asyncio.sleep(0)
        assert seen.counts[-1] == {"a": 1, "b": 1}
        await busy
        await asyncio.sleep(0.05)  # 2 and 3 in the backend, 4 still waiting: its request too
        assert seen.counts[-1] == {"a": 1, "b": 1}
        one.cancel()  # its client went away
        with pytest.raises(asyncio.CancelledError):
            await one
        assert seen.counts[-1] == {"a": 1}
        walks = walked.walks
        await asyncio.gather(three, untagged)
        assert seen.counts[-1] == {} and walked.walks == walks  # batches cut, none walked the queue
        await batcher.close()

    run(main())
