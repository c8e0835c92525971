"""benchmarks/ratio_spread.py: runs benchmarks.onnx_runtime in both configurations, in turn, and
summarizes the runs. benchmarks.onnx_runtime is a fake here that writes made-up rows: this tests the
orchestration and the summary, not ONNX Runtime (tests/benchmarks/test_onnx_runtime_measure.py)."""

from __future__ import annotations

import json

import pytest

from benchmarks import onnx_runtime, ratio_spread


def test_each_run_measures_both_configurations_in_turn_and_the_summary_spans_the_runs(tmp_path, tiny_onnx,
                                                                                        monkeypatch):
    calls = []

    def fake_onnx_runtime(argv):
        calls.append(argv)
        out = argv[argv.index("--out") + 1]
        served = "--sessions" in argv
        ratio = 0.80 + 0.01 * len(calls)  # grows call by call: the order is visible in the summary
        rows = [{"batch": b, "ratio": ratio + (0.1 if served else 0), "int8_speedup": 2.0} for b in (32, 128)]
        with open(out, "w") as f:
            json.dump({"cpu": {}, "rows": rows}, f)
        return 0

    monkeypatch.setattr(onnx_runtime, "main", fake_onnx_runtime)
    monkeypatch.setenv("ACMIX_WORKERS", "2")
    monkeypatch.setenv("ACMIX_INTRA_OP_THREADS", "1")
    out = tmp_path / "spread.json"
    assert ratio_spread.main(["--onnx", str(tiny_onnx), "--runs", "3", "--batches", "32", "128",
                              "--out", str(out)]) == 0
    assert len(calls) == 6
    assert ["--sessions" in argv for argv in calls] == [False, True] * 3  # alternated within each run
    assert all(argv[argv.index("--onnx") + 1] == str(tiny_onnx) for argv in calls)
    result = json.loads(out.read_text())
    (one, served) = result["summary"]
    assert served.endswith("(as served)") and served.startswith("2 x 1")
    single = result["summary"][one]["32"]["ratio"]
    assert single["runs"] == pytest.approx([0.81, 0.83, 0.85]) and single["median"] == pytest.approx(0.83)
    assert single["low"] == pytest.approx(0.81) and single["high"] == pytest.approx(0.85)
    assert result["summary"][served]["128"]["ratio"]["high"] == pytest.approx(0.96)
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_a_failing_run_stops_with_its_status(tmp_path, tiny_onnx, monkeypatch):
    monkeypatch.setattr(onnx_runtime, "main", lambda argv: 2)
    assert ratio_spread.main(["--onnx", str(tiny_onnx), "--out", str(tmp_path / "s.json")]) == 2
    assert not (tmp_path / "s.json").exists()
