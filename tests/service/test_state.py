"""Where images are decoded: small ones on the event loop, larger ones in the decode threads."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from model.preprocessing import ImageError, decode_image, preprocess
from service.metrics import Metrics
from service.settings import Settings
from service.state import ServiceState
from tests.conftest import jpeg_bytes


class CountingPool(ThreadPoolExecutor):
    """A real thread pool that counts what it is given."""

    def __init__(self):
        super().__init__(1)
        self.submitted = 0

    def submit(self, fn, /, *args, **kwargs):
        self.submitted += 1
        return super().submit(fn, *args, **kwargs)


def decoded_by_state(data: bytes, **settings) -> tuple[np.ndarray, int]:
    state = ServiceState(Settings(**settings), Metrics())
    state.decode_pool = pool = CountingPool()
    try:
        return asyncio.run(state.decode(data)), pool.submitted
    finally:
        pool.shutdown()


@pytest.mark.parametrize("size, in_threads", [(32, 0), (128, 0), (129, 1), (600, 1)])
def test_images_over_the_inline_limit_go_to_the_decode_threads(size, in_threads):
    pixels = np.random.default_rng(size).integers(0, 256, (size, size, 3), dtype=np.uint8)
    data = jpeg_bytes(pixels)
    image, submitted = decoded_by_state(data, inline_decode_pixels=128 * 128)
    assert submitted == in_threads
    np.testing.assert_array_equal(image, preprocess(decode_image(data)))


def test_the_pixel_limit_is_checked_before_decoding():
    data = jpeg_bytes(np.zeros((300, 300, 3), np.uint8))
    with pytest.raises(ImageError, match="over the pixel limit of 40000"):
        decoded_by_state(data, max_image_pixels=40_000)


def test_bytes_that_are_no_image_fail_on_the_loop_with_the_cause():
    with pytest.raises(ImageError, match="corrupt or truncated image: a GIF file"):
        decoded_by_state(b"GIF89a but not really" * 10)
    with pytest.raises(ImageError, match="not a recognized image format"):
        decoded_by_state(b"no image at all" * 10)


def test_an_image_whose_deadline_passed_while_it_waited_for_a_decode_thread_is_not_decoded(monkeypatch):
    """The one decode thread is busy past the second request's deadline: that one answers 504 and
    its image is never decoded (a fake slow decoder stands in for a large image)."""
    import time

    from service import state as state_module
    from service.errors import DeadlineExceeded

    decoded = []

    def slow_preprocess(image):
        decoded.append(image.size)
        time.sleep(0.3)
        return np.zeros((3, 128, 128), np.float32)

    monkeypatch.setattr(state_module, "preprocess", slow_preprocess)
    state = ServiceState(Settings(decode_threads=1, inline_decode_pixels=0), Metrics())
    state.decode_pool = ThreadPoolExecutor(1)
    first, second = (jpeg_bytes(np.zeros((size, size, 3), np.uint8)) for size in (40, 50))

    async def both():
        now = time.perf_counter()
        return await asyncio.gather(state.decode(first, now + 5), state.decode(second, now + 0.1),
                                    return_exceptions=True)

    try:
        results = asyncio.run(both())
    finally:
        state.decode_pool.shutdown()
    assert results[0].shape == (3, 128, 128) and isinstance(results[1], DeadlineExceeded)
    assert decoded == [(40, 40)]
