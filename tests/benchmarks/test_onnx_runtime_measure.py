"""benchmarks/onnx_runtime.py's measurement: a model's sessions run at once, and its figure is the sum
of their rates. The sessions are fakes that sleep per call and count the calls in flight: this tests
the measurement's logic, not ONNX Runtime."""

from __future__ import annotations

import statistics
import threading
import time

import pytest

from benchmarks.onnx_runtime import measure, paired_ratio


class SleepingSession:
    def __init__(self, seconds: float, shared: dict):
        self.seconds, self.shared = seconds, shared

    def run(self, outputs, feeds):
        with self.shared["lock"]:
            self.shared["in_flight"] += 1
            self.shared["most"] = max(self.shared["most"], self.shared["in_flight"])
        time.sleep(self.seconds)
        with self.shared["lock"]:
            self.shared["in_flight"] -= 1


def test_a_models_sessions_run_at_once_and_their_rates_add_up():
    shared = {"lock": threading.Lock(), "in_flight": 0, "most": 0}  # one count over both models
    one = [SleepingSession(0.01, shared)]
    three = [SleepingSession(0.01, shared) for _ in range(3)]
    rates = measure({"one": one, "three": three}, batch=8, seconds=0.6, rounds=2)
    # 3: the three sessions of one model together; not 4: never sessions of two models at once
    assert shared["most"] == 3
    assert len(rates["one"]) == len(rates["three"]) == 2  # one figure per round
    one_rate, three_rate = statistics.median(rates["one"]), statistics.median(rates["three"])
    assert 0.6 * 8 / 0.01 < one_rate <= 8 / 0.01  # the batch over the median call time
    assert 2.4 < three_rate / one_rate < 3.3


def test_a_ratio_is_taken_within_each_round_so_that_the_machines_drift_cancels():
    """The machine runs at half speed in round 2 and double in round 3; A is half as fast as B in every
    round but the last. The ratio of the medians would say 0.67."""
    a, b = [100, 50, 200, 100], [200, 100, 400, 100]
    median, low, high = paired_ratio(a, b)
    assert median == 0.5 and low == 0.5 and high == pytest.approx(0.625)
    assert paired_ratio([3.0], [2.0]) == (1.5, 1.5, 1.5)


def test_make_bench_measures_onnx_runtime_as_the_service_settings_run_it(monkeypatch):
    from benchmarks.__main__ import served_sessions
    from model.runtime import available_cores

    monkeypatch.setenv("ACMIX_WORKERS", "3")
    monkeypatch.setenv("ACMIX_INTRA_OP_THREADS", "2")
    assert served_sessions() == ["--sessions", "3", "--threads", "2"]  # one batch per process with several
    monkeypatch.setenv("ACMIX_WORKERS", "1")
    monkeypatch.delenv("ACMIX_INTRA_OP_THREADS")
    # a single process computes two batches at once, each with half the cores
    assert served_sessions() == ["--sessions", "2", "--threads", str(max(1, available_cores() // 2))]
