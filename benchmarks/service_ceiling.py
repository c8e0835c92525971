"""The service's own ceiling, and what several server processes add: one run, side by side.

    python -m benchmarks.service_ceiling [--seconds 10] [--connections 64] [--rounds 2]

The real service (`python -m service`, the real ONNX Runtime backend) serving a trivial ONNX model
with the same input and output (harness/tiny_model.py: inference costs next to nothing), with 1
and with 2 processes (`--workers`), under wrk (a compiled load generator) with N connections:

* `jpeg`: single 32x32 JPEG uploads to /predict;
* `v2_binary`: one preprocessed image as a binary FP32 tensor to /v2/models/alexnet_acmix/infer;
* `batch`: 8 JPEGs per /predict/batch request (images/s = 8 x req/s);

then the real model (--onnx) for single JPEG uploads with 1 and 2 processes. Per case: req/s
(and per process), p99, errors, and CPU seconds per request (user + system time of the server's
processes over the run). Rounds alternate the servers, all started first, so that drift on this
shared machine hits them alike; medians over the rounds. Prints the CPU; writes
build/bench/service_ceiling.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
from pathlib import Path

from benchmarks.service_load import WRK_RESULT, preflight, run_wrk, sample_jpeg
from export.errors import ExportError
from harness.server import start_server, stop
from harness.tiny_model import write_tiny_model
from model import paths
from model.cli import command, one_line_errors, positive_float, positive_int
from model.data import DataError
from model.files import writable
from runtime.backend import BackendError
from runtime.cpu import cpu_info, describe

SCRIPT = r"""
wrk.method = "POST"
local f = io.open(os.getenv("BENCH_BODY"), "rb")
wrk.body = f:read("*all")
f:close()
wrk.headers["Content-Type"] = os.getenv("BENCH_CONTENT_TYPE")
local header_length = os.getenv("BENCH_HEADER_LENGTH")
if header_length ~= nil and header_length ~= "" then
  wrk.headers["Inference-Header-Content-Length"] = header_length
end
""" + WRK_RESULT
BOUNDARY = "benchboundary"


def multipart(files: list[bytes]) -> bytes:
    parts = [f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="x{i}.jpg"\r\n'
             f"Content-Type: image/jpeg\r\n\r\n".encode() + data + b"\r\n" for i, data in enumerate(files)]
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def request_kinds(folder: Path) -> dict[str, dict]:
    """Per kind: the route, the body file, its content type and (v2) header length; images per request."""
    from model.preprocessing import decode_image, preprocess

    jpeg = sample_jpeg(folder / "x.jpg").read_bytes()
    tensor = preprocess(decode_image(jpeg))[None].astype("<f4")
    header = json.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": list(tensor.shape),
                                     "parameters": {"binary_data_size": tensor.nbytes}}]}).encode()
    bodies = {"jpeg": multipart([jpeg]), "v2_binary": header + tensor.tobytes(), "batch": multipart([jpeg] * 8)}
    kinds = {
        "jpeg": {"path": "/predict", "type": f"multipart/form-data; boundary={BOUNDARY}", "images": 1},
        "v2_binary": {"path": "/v2/models/alexnet_acmix/infer", "type": "application/octet-stream",
                      "header_length": str(len(header)), "images": 1},
        "batch": {"path": "/predict/batch", "type": f"multipart/form-data; boundary={BOUNDARY}", "images": 8},
    }
    for name, body in bodies.items():
        (folder / f"{name}.body").write_bytes(body)
        kinds[name]["body"] = str(folder / f"{name}.body")
    return kinds


def cpu_seconds(pid: int) -> float:
    """User + system time of a process and of its children (the workers), in seconds."""
    pids = [pid] + [int(p) for p in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True,
                                                      text=True).stdout.split()]
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for each in pids:
        try:
            fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
        except (OSError, IndexError, ValueError):
            pass
    return total


def measure(process, url: str, kind: dict, connections: int, seconds: float, script: Path, image: Path) -> dict:
    before = cpu_seconds(process.pid)
    result = run_wrk(url, connections, seconds, image, script, path=kind["path"],
                     env={"BENCH_BODY": kind["body"], "BENCH_CONTENT_TYPE": kind["type"],
                          "BENCH_HEADER_LENGTH": kind.get("header_length", "")})
    used = cpu_seconds(process.pid) - before
    result["cpu_s_per_request"] = used / max(result["requests"], 1)
    result["images_per_s"] = result["throughput_rps"] * kind["images"]
    return result


@one_line_errors(BackendError, DataError, ExportError)
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.service_ceiling", description=__doc__.split("\n\n")[0])
    parser.add_argument("--onnx", default=paths.ONNX, help="the real model, for its own rows")
    parser.add_argument("--connections", type=positive_int, default=64)
    parser.add_argument("--seconds", type=positive_float, default=10)
    parser.add_argument("--rounds", type=positive_int, default=2)
    parser.add_argument("--out", default="build/bench/service_ceiling.json")
    args = parser.parse_args(argv)
    writable(args.out)  # before the measurement, not after it
    preflight(Path(args.onnx))
    print(f"CPU: {describe()}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        tiny = write_tiny_model(folder / "tiny.onnx")
        kinds = request_kinds(folder)
        (folder / "post.lua").write_text(SCRIPT)
        cases = [(model, workers, kind) for model in ("trivial", "real") for workers in (1, 2)
                 for kind in (kinds if model == "trivial" else ["jpeg"])]
        servers = {}
        try:
            for model, workers in {(m, w) for m, w, _ in cases}:
                servers[(model, workers)] = start_server(tiny if model == "trivial" else args.onnx, workers=workers,
                                                         max_batch_size=32, timeout=180)
            runs = {case: [] for case in cases}
            for _ in range(args.rounds):
                for model, workers, kind in cases:
                    process, url = servers[(model, workers)]
                    runs[(model, workers, kind)].append(measure(process, url, kinds[kind], args.connections,
                                                                args.seconds, folder / "post.lua", folder / "x.jpg"))
        finally:
            for process, _ in servers.values():
                stop(process)
    rows = []
    for (model, workers, kind), results in runs.items():
        median = lambda key: statistics.median(r[key] for r in results)  # noqa: E731, B023
        rows.append({"model": model, "workers": workers, "kind": kind, "connections": args.connections,
                     "throughput_rps": median("throughput_rps"), "images_per_s": median("images_per_s"),
                     "rps_per_process": median("throughput_rps") / workers, "p99_ms": median("p99_ms"),
                     "worst_p99_ms": max(r["p99_ms"] for r in results), "errors": sum(r["errors"] for r in results),
                     "cpu_ms_per_request": median("cpu_s_per_request") * 1000, "rounds": results})
    by = {(r["model"], r["workers"], r["kind"]): r for r in rows}
    print(f"{'model':<8} {'kind':<10} {'processes':>9} {'req/s':>8} {'per proc':>8} {'img/s':>8} {'p99 ms':>7} "
          f"{'CPU ms/req':>10} {'errors':>6} {'x one':>6}")
    for r in rows:
        one = by[(r["model"], 1, r["kind"])]["throughput_rps"]
        print(f"{r['model']:<8} {r['kind']:<10} {r['workers']:>9} {r['throughput_rps']:>8.0f} {r['rps_per_process']:>8.0f} "
              f"{r['images_per_s']:>8.0f} {r['p99_ms']:>7.1f} {r['cpu_ms_per_request']:>10.2f} {r['errors']:>6} "
              f"{r['throughput_rps'] / one:>6.2f}")
    Path(args.out).write_text(json.dumps({"cpu": cpu_info(), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(command(main))
