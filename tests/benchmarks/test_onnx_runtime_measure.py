"""benchmarks/onnx_runtime.py's measurement: a model's sessions run at once, and its figure is the sum
of their rates. The sessions are fakes that sleep per call and count the calls in flight: this tests
the measurement's logic, not ONNX Runtime."""

from __future__ import annotations

import threading
import time

from benchmarks.onnx_runtime import measure


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
    assert 0.6 * 8 / 0.01 < rates["one"] <= 8 / 0.01  # the batch over the median call time
    assert 2.4 < rates["three"] / rates["one"] < 3.3


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
