"""TensorRT fp32, fp16 and int8 engines of AlexNet-ACmix, throughput by batch size (GPU host only).

    python -m benchmarks.tensorrt_engines [--onnx build/alexnet_acmix.onnx] [--batches 1 8 32 128 256]

Provisions each engine as the service does (export/provision.py: built, verified against the
reference logits, or reused per its metadata), then times TensorRTBackend.infer, which includes
the host<->device copies the service pays. Without a GPU and TensorRT it says why and writes nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from export.errors import ExportError
from model import paths
from model.cli import command, one_line_errors, positive_float, positive_int
from model.data import DataError
from model.files import writable
from runtime.backend import BackendError


@one_line_errors(BackendError, DataError, ExportError)
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tensorrt_engines", description=__doc__.split("\n\n")[0])
    parser.add_argument("--onnx", default=paths.ONNX)
    parser.add_argument("--batches", type=positive_int, nargs="+", default=[1, 8, 32, 128, 256])
    parser.add_argument("--seconds", type=positive_float, default=2.0)
    parser.add_argument("--out", default="build/bench/tensorrt.json")
    args = parser.parse_args(argv)
    writable(args.out)  # before the measurement, not after it

    from export.provision import provision
    from runtime.artifacts import ArtifactPlan, EngineSpec, default_engine_path, timing_cache_path
    from runtime.cuda import tensorrt_status

    available, reason = tensorrt_status()
    if not available:
        print(f"TensorRT benchmark skipped: {reason}", file=sys.stderr)
        return 0
    from runtime.tensorrt import TensorRTBackend

    engines = {}
    largest = max(args.batches)
    for precision in ("fp32", "fp16", "int8"):
        path = default_engine_path(args.onnx, precision)
        spec = EngineSpec(precision, 1, min(32, largest), largest)
        provision(ArtifactPlan("tensorrt", precision, Path("unused.pdparams"), Path(args.onnx), engine=path,
                               engine_spec=spec, timing_cache=timing_cache_path(path)))
        backend = TensorRTBackend(path, largest)
        backend.load()
        series = []
        for batch in args.batches:
            x = np.random.default_rng(0).standard_normal((batch, 3, 128, 128)).astype(np.float32)
            backend.infer(x)
            rates, end = [], time.perf_counter() + args.seconds
            while time.perf_counter() < end:
                started = time.perf_counter()
                backend.infer(x)
                rates.append(batch / (time.perf_counter() - started))
            series.append({"batch": batch, "img_s": statistics.median(rates)})
            print(f"TensorRT {precision} batch {batch}: {series[-1]['img_s']:.0f} img/s")
        backend.close()
        engines[precision] = series
    Path(args.out).write_text(json.dumps({"engines": engines}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(command(main))
