"""Process-wide Paddle settings shared by training, evaluation and export."""

from __future__ import annotations

import logging
import os
import warnings


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def import_paddle(threads: int | None = None):
    """Import paddle quietly, on the CPU, using `threads` (default: every core available).

    Paddle's CPU kernels use one thread unless told otherwise.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import paddle
    logging.getLogger("paddle").setLevel(logging.ERROR)
    paddle.set_device("cpu")
    paddle.base.core.set_num_threads(threads or available_cores())
    return paddle
