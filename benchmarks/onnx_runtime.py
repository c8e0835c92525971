"""ONNX Runtime CPU throughput of AlexNet-ACmix against the plain AlexNet, exported the same way.

    python -m benchmarks.onnx_runtime [--batches 1 8 32 128] [--seconds 3]

Both networks go through export/onnx_export.py (paddle.jit.save, paddle2onnx, onnxslim) with
seeded random weights (speed does not depend on the values), then run in one process with ONNX
Runtime's default session options, in short alternating blocks (a pause before each lets the other
session's threads stop spinning) so that machine load hits both alike. Prints images/s per batch
size and the ratio; writes build/bench/onnx_runtime.json. (The service turns thread spinning off,
since it shares the cores with HTTP handling; benchmarks/service_load.py measures that setting.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from export.onnx_export import export_onnx
from model.runtime import available_cores, import_paddle
from model.spec import INPUT_NAME, OUTPUT_NAME


def export_both(folder: Path) -> dict[str, Path]:
    paddle = import_paddle()
    from model.alexnet import build_model

    paths = {}
    for arch in ("alexnet_acmix", "alexnet"):
        paddle.seed(0)
        weights = folder / f"{arch}.pdparams"
        paddle.save(build_model(arch).state_dict(), str(weights))
        paths[arch] = export_onnx(weights, folder / f"{arch}.onnx", arch=arch)
    return paths


def measure(sessions: dict, batch: int, seconds: float, rounds: int = 4) -> dict[str, float]:
    x = np.random.default_rng(0).standard_normal((batch, 3, 128, 128)).astype(np.float32)
    rates = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, session in sessions.items():
            time.sleep(0.2)
            session.run([OUTPUT_NAME], {INPUT_NAME: x})
            end = time.perf_counter() + seconds / rounds
            while time.perf_counter() < end:
                started = time.perf_counter()
                session.run([OUTPUT_NAME], {INPUT_NAME: x})
                rates[name].append(batch / (time.perf_counter() - started))
    return {name: statistics.median(values) for name, values in rates.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--seconds", type=float, default=3.0, help="per model and batch size")
    parser.add_argument("--out", default="build/bench/onnx_runtime.json")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        paths = export_both(Path(tmp))
        import onnxruntime as ort

        sessions = {arch: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                    for arch, path in paths.items()}
        rows = []
        for batch in tqdm(args.batches, desc="batch sizes"):
            rates = measure(sessions, batch, args.seconds)
            rows.append({"batch": batch, "alexnet_acmix_img_s": rates["alexnet_acmix"],
                         "alexnet_img_s": rates["alexnet"], "ratio": rates["alexnet_acmix"] / rates["alexnet"]})
    print(f"{'batch':>5} {'ACmix img/s':>12} {'AlexNet img/s':>14} {'ratio':>6}")
    for row in rows:
        print(f"{row['batch']:>5} {row['alexnet_acmix_img_s']:>12.0f} {row['alexnet_img_s']:>14.0f} {row['ratio']:>6.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": available_cores(), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
