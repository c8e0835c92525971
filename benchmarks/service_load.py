"""The service under load against the raw backend, side by side in one run.

    python -m benchmarks.service_load [--onnx build/alexnet_acmix.onnx] [--precision fp32|int8]
                                      [--concurrency 64] [--seconds 10] [--rounds 3]

The real server (`python -m service`, default settings but the batch size; ACMIX_PRECISION from
--precision: int8 serves the int8 file beside --onnx, made first where it is missing or stale)
starts once. Then, each round:
1. Raw backend: ONNX Runtime on the served file at the service's max batch size (32), in this
   process (one session, every core), for up to 5 s: images per second.
2. Load: wrk (Debian package `wrk`; a compiled load generator, so the client costs little of the
   two cores) with N connections each POSTing a single 32x32 JPEG to /predict for T seconds:
   requests per second, p50/p95/p99 latency, errors (non-2xx and socket errors).

Alternating the two keeps a noisy machine's drift out of the ratio: each round's service
throughput is divided by that round's raw figure, and the medians over the rounds are printed,
with the worst p99. Writes build/bench/service_load.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from export.errors import ExportError
from harness.server import start_server, stop
from model import paths
from model.cli import command, non_negative_float, one_line_errors, positive_float, positive_int
from model.data import DataError
from model.files import writable
from runtime.artifacts import onnx_metadata
from runtime.backend import BackendError
from runtime.cpu import cpu_info

# wrk's summary as one line that run_wrk parses; every wrk script here ends with it.
WRK_RESULT = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT requests=%d seconds=%f p50=%d p95=%d p99=%d non2xx=%d connect=%d read=%d write=%d timeout=%d\n",
    summary.requests, summary.duration / 1e6, latency:percentile(50), latency:percentile(95),
    latency:percentile(99), e.status, e.connect, e.read, e.write, e.timeout))
end
"""
WRK_SCRIPT = r"""
wrk.method = "POST"
wrk.headers["Content-Type"] = "multipart/form-data; boundary=benchboundary"
local f = io.open(os.getenv("BENCH_IMAGE"), "rb")
local image = f:read("*all")
f:close()
wrk.body = "--benchboundary\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.jpg\"\r\n" ..
           "Content-Type: image/jpeg\r\n\r\n" .. image .. "\r\n--benchboundary--\r\n"
""" + WRK_RESULT


def raw_backend_throughput(onnx: Path, batch: int, seconds: float) -> float:
    from runtime.onnxruntime import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend(onnx, max_batch=batch, threads=os.cpu_count())
    backend.load()
    x = np.random.default_rng(0).standard_normal((batch, 3, 128, 128)).astype(np.float32)
    backend.infer(x)
    rates, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end:
        started = time.perf_counter()
        backend.infer(x)
        rates.append(batch / (time.perf_counter() - started))
    backend.close()
    return statistics.median(rates)


def sample_jpeg(path: Path) -> Path:
    """A 32x32 JPEG like CIFAR-10's (smooth color regions plus noise), seeded."""
    import io

    from PIL import Image

    rng = np.random.default_rng(11)
    gradient = np.linspace(0, 1, 32)[None, :, None] * rng.integers(60, 200, 3)[None, None, :]
    pixels = np.clip(gradient + rng.normal(0, 20, (32, 32, 3)) + 30, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=75)
    path.write_bytes(buffer.getvalue())
    return path


def wrk_inputs(folder: Path) -> tuple[Path, Path]:
    """(the sample JPEG, wrk's POST script) written into `folder`."""
    script = folder / "post.lua"
    script.write_text(WRK_SCRIPT)
    return sample_jpeg(folder / "x.jpg"), script


def run_wrk(url: str, connections: int, seconds: float, image: Path, script: Path, path: str = "/predict",
            env: dict[str, str] | None = None) -> dict:
    """wrk against url + path with `script` (BENCH_IMAGE and `env` in its environment): its figures."""
    command = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "10s", "-s", str(script),
               f"{url}{path}"]
    output = subprocess.run(command, capture_output=True, text=True,
                            env={**os.environ, "BENCH_IMAGE": str(image), **(env or {})}, check=True).stdout
    match = re.search(r"RESULT (.*)", output)
    if not match:
        raise RuntimeError(f"unexpected wrk output:\n{output}")
    fields = dict(item.split("=") for item in match.group(1).split())
    requests, duration = int(fields["requests"]), float(fields["seconds"])
    errors = sum(int(fields[k]) for k in ("non2xx", "connect", "read", "write", "timeout"))
    return {
        "concurrency": connections,
        "seconds": duration,
        "requests": requests,
        "throughput_rps": (requests - int(fields["non2xx"])) / duration,
        "p50_ms": int(fields["p50"]) / 1000,
        "p95_ms": int(fields["p95"]) / 1000,
        "p99_ms": int(fields["p99"]) / 1000,
        "errors": errors,
    }


def preflight(onnx: Path) -> None:
    """ValueError naming why a load benchmark cannot run here (no ONNX, one that does not load, no
    wrk); each benchmark's one_line_errors turns it into `error: <cause>` and exit status 2."""
    if not onnx.is_file():
        raise ValueError(f"{onnx}: no such ONNX file (make export, or python -m export onnx)")
    onnx_metadata(onnx)  # ValueError naming the file where it is no ONNX
    if shutil.which("wrk") is None:
        raise ValueError("wrk is not installed (apt-get install wrk)")


def summarize(rounds: list[dict], concurrency: int) -> dict:
    """One concurrency's figures over the rounds: medians, the worst p99, every error."""
    runs = [r for r in rounds if r["concurrency"] == concurrency]
    median = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
    return {
        "concurrency": concurrency,
        "rounds": len(runs),
        "throughput_rps": median("throughput_rps"),
        "ratio_to_raw": median("ratio_to_raw"),
        "p50_ms": median("p50_ms"),
        "p95_ms": median("p95_ms"),
        "p99_ms": median("p99_ms"),
        "worst_p99_ms": max(r["p99_ms"] for r in runs),
        "errors": sum(r["errors"] for r in runs),
    }


@one_line_errors(BackendError, DataError, ExportError)
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.service_load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--onnx", default=paths.ONNX, help="the fp32 ONNX")
    parser.add_argument("--precision", choices=["fp32", "int8"], default="fp32",
                        help="what the service serves (ACMIX_PRECISION); int8: the file beside --onnx")
    parser.add_argument("--batch", type=positive_int, default=32, help="the service's max batch size")
    parser.add_argument("--concurrency", type=positive_int, nargs="+", default=[64])
    parser.add_argument("--seconds", type=positive_float, default=10, help="per load run")
    parser.add_argument("--rounds", type=positive_int, default=3, help="raw backend then each load run, this many times")
    parser.add_argument("--queue-delay-ms", type=non_negative_float, default=5.0)
    parser.add_argument("--out", default="build/bench/service_load.json")
    args = parser.parse_args(argv)
    out = writable(args.out)  # before the measurement, not after it

    onnx = Path(args.onnx)
    preflight(onnx)
    served = onnx
    if args.precision == "int8":
        from export.int8 import int8_beside

        served = int8_beside(onnx)  # where the service looks for it

    rounds, raws = [], []
    with tempfile.TemporaryDirectory() as tmp:
        image, script = wrk_inputs(Path(tmp))
        process, url = start_server(onnx, precision=args.precision, max_batch_size=args.batch,
                                    max_queue_delay_ms=args.queue_delay_ms, max_queue_size=4096, log_level="warning")
        try:
            run_wrk(url, 8, 2, image, script)  # warm-up
            for number in range(1, args.rounds + 1):
                print(f"round {number}/{args.rounds}: raw backend, batch {args.batch} ...", file=sys.stderr)
                raw = raw_backend_throughput(served, args.batch, seconds=min(args.seconds, 5))
                raws.append(raw)
                for connections in args.concurrency:
                    print(f"round {number}/{args.rounds}: service, {connections} connections for {args.seconds:g} s ...",
                          file=sys.stderr)
                    run = run_wrk(url, connections, args.seconds, image, script)
                    rounds.append({**run, "round": number, "raw_backend_img_s": raw,
                                   "ratio_to_raw": run["throughput_rps"] / raw})
        finally:
            stop(process)

    raw = statistics.median(raws)
    results = [summarize(rounds, c) for c in args.concurrency]
    print(f"\nraw backend (ONNX Runtime, {args.precision}, batch {args.batch}): {raw:.0f} img/s "
          f"(median of {len(raws)}: {', '.join(f'{r:.0f}' for r in raws)})")
    print("service: medians over the rounds; ratio: each round's service req/s over its own raw figure")
    print(f"{'concurrency':>11} {'req/s':>8} {'ratio':>6} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} {'worst p99':>9} "
          f"{'errors':>6}")
    for r in results:
        print(f"{r['concurrency']:>11} {r['throughput_rps']:>8.0f} {r['ratio_to_raw']:>6.2f} {r['p50_ms']:>7.1f} "
              f"{r['p95_ms']:>7.1f} {r['p99_ms']:>7.1f} {r['worst_p99_ms']:>9.1f} {r['errors']:>6}")
    out.write_text(json.dumps({"cpu": cpu_info(), "precision": args.precision, "served": str(served),
                               "raw_backend_img_s": raw, "raw_rounds": raws, "batch": args.batch,
                               "runs": results, "rounds": rounds}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(command(main))
