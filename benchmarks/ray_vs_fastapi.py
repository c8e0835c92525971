"""Ray Serve (2 replicas) against the single FastAPI process, under the same load, in one run.

    python -m benchmarks.ray_vs_fastapi [--onnx build/alexnet_acmix.onnx] [--concurrency 64] [--seconds 15]

Both serve the same ONNX with ONNX Runtime; wrk drives each in turn with N connections POSTing a
single 32x32 JPEG to /predict. Prints throughput and p50/p99 for both; writes
build/bench/ray_vs_fastapi.json. On this 2-core machine the 2 replicas share the cores with each
other, Ray's proxy and the load generator, so no gain is expected here; see the README.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.service_load import preflight, run_wrk, wrk_inputs
from export.errors import ExportError
from harness.server import free_port, start_server, stop, wait_ready
from model import paths
from model.cli import command, one_line_errors, positive_float, positive_int
from model.data import DataError
from model.files import writable
from runtime.backend import BackendError
from runtime.cpu import cpu_info


def start_ray(onnx: Path, port: int, replicas: int, folder: Path) -> subprocess.Popen:
    config = {
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{
            "name": "alexnet_acmix", "route_prefix": "/", "import_path": "service.ray_app:build_app",
            "runtime_env": {"env_vars": {
                "ACMIX_BACKEND": "onnxruntime", "ACMIX_ONNX_PATH": str(onnx.resolve()),
                "ACMIX_RAY_REPLICAS": str(replicas), "ACMIX_RAY_CPUS_PER_REPLICA": str(1 / replicas),
                "ACMIX_INTRA_OP_THREADS": "1", "ACMIX_DECODE_THREADS": "1", "ACMIX_LOG_LEVEL": "warning"}},
        }],
    }
    path = folder / "serve.json"
    path.write_text(json.dumps(config))
    serve = Path(sys.executable).parent / "serve"
    process = subprocess.Popen([str(serve), "run", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}, start_new_session=True)
    if not wait_ready(f"http://127.0.0.1:{port}", process, timeout=180, interval=1):
        os.killpg(process.pid, signal.SIGTERM)
        raise RuntimeError("Ray Serve did not become ready in 180 s")
    return process


def stop_ray(process: subprocess.Popen, grace_s: float = 60, cleanup: list[str] | None = None) -> None:
    """SIGINT to `serve run`'s process group (Ray's own shutdown); where it has not ended after
    `grace_s`, SIGKILL to the group and `cleanup` (default `ray stop --force`, for the cluster
    processes it started), with one line saying so (seen once in session 20: a measured run whose
    shutdown hung, which ended `make bench` in a traceback)."""
    os.killpg(process.pid, signal.SIGINT)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        print(f"Ray Serve did not stop {grace_s:g} s after SIGINT: killed", file=sys.stderr)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        subprocess.run(cleanup or [str(Path(sys.executable).parent / "ray"), "stop", "--force"],
                       capture_output=True, timeout=120, check=False)


@one_line_errors(BackendError, DataError, ExportError)
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ray_vs_fastapi", description=__doc__.split("\n\n")[0])
    parser.add_argument("--onnx", default=paths.ONNX)
    parser.add_argument("--concurrency", type=positive_int, default=64)
    parser.add_argument("--seconds", type=positive_float, default=15)
    parser.add_argument("--replicas", type=positive_int, default=2)
    parser.add_argument("--out", default="build/bench/ray_vs_fastapi.json")
    args = parser.parse_args(argv)
    writable(args.out)  # before the measurement, not after it
    onnx = Path(args.onnx)
    preflight(onnx)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        image, script = wrk_inputs(Path(tmp))
        process, url = start_server(onnx, log_level="warning")
        try:
            run_wrk(url, 8, 2, image, script)
            results["fastapi"] = run_wrk(url, args.concurrency, args.seconds, image, script)
        finally:
            stop(process)
        port = free_port()
        ray = start_ray(onnx, port, args.replicas, Path(tmp))
        try:
            url = f"http://127.0.0.1:{port}"
            run_wrk(url, 8, 2, image, script)
            results[f"ray_{args.replicas}_replicas"] = run_wrk(url, args.concurrency, args.seconds, image, script)
        finally:
            stop_ray(ray)
    print(f"{'server':>16} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6}")
    for name, r in results.items():
        print(f"{name:>16} {r['throughput_rps']:>7.0f} {r['p50_ms']:>7.1f} {r['p99_ms']:>7.1f} {r['errors']:>6}")
    Path(args.out).write_text(json.dumps({"cpu": cpu_info(), **results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(command(main))
