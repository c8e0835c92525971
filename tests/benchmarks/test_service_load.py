"""benchmarks/service_load.py --precision: the service and the raw backend measure the same file."""

from __future__ import annotations

import json
import shutil

from runtime.artifacts import derived_onnx_path


def test_int8_is_served_and_measured_raw_from_the_file_beside_the_fp32_one(monkeypatch, tmp_path, tiny_onnx):
    """Fakes for the server, wrk and the raw backend, and a copy for the int8 file: what is under test
    is which file and precision each side gets (the real ones run in `make bench`)."""
    import export.int8
    from benchmarks import service_load

    int8 = derived_onnx_path(tiny_onnx, "int8")
    shutil.copyfile(tiny_onnx, int8)
    monkeypatch.setattr(export.int8, "int8_beside", lambda onnx: derived_onnx_path(onnx, "int8"))
    monkeypatch.setattr(service_load.shutil, "which", lambda name: f"/usr/bin/{name}")
    started, measured = {}, []
    monkeypatch.setattr(service_load, "start_server",
                        lambda onnx, **settings: (started.update(onnx=onnx, **settings), ("process", "url"))[1])
    monkeypatch.setattr(service_load, "stop", lambda process: 0)
    monkeypatch.setattr(service_load, "raw_backend_throughput",
                        lambda path, batch, seconds: (measured.append(path), 100.0)[1])
    monkeypatch.setattr(service_load, "run_wrk", lambda url, connections, seconds, image, script: {
        "concurrency": connections, "seconds": seconds, "requests": 50, "throughput_rps": 50.0,
        "p50_ms": 1.0, "p95_ms": 2.0, "p99_ms": 3.0, "errors": 0})
    out = tmp_path / "load.json"
    assert service_load.main(["--onnx", str(tiny_onnx), "--precision", "int8", "--rounds", "2", "--seconds", "1",
                              "--out", str(out)]) == 0
    assert started["onnx"] == tiny_onnx and started["precision"] == "int8"  # the service derives the int8 path
    assert measured == [int8, int8]
    result = json.loads(out.read_text())
    assert result["precision"] == "int8" and result["served"] == str(int8)
    assert result["runs"][0]["ratio_to_raw"] == 0.5
