"""ONNX Runtime CPU throughput of AlexNet-ACmix (fp32 and int8) against the plain AlexNet (fp32).

    python -m benchmarks.onnx_runtime [--onnx build/alexnet_acmix.onnx] [--batches 1 8 32 128] [--seconds 3]
                                      [--rounds 4] [--threads N] [--sessions K] [--whole-batch]

AlexNet-ACmix is the exported model the service serves (--onnx) and its int8 QDQ file beside it
(made by export/int8.py where missing or made from another fp32 file); the plain AlexNet is exported the same way
(export/onnx_export.py) from seeded random weights (speed does not depend on the values, and
neither file holds subnormal numbers). Every session comes from runtime.onnxruntime.create_session,
with the service's options (denormals as zero, thread spinning off), in one process, in short
alternating blocks so that machine load hits all alike. --threads: ONNX Runtime's intra-op threads
per session; default one per core, as a single service process uses. --sessions K runs K sessions
of each model at once and reports their total, as the service's K processes on a many-core host
would (settings `workers`, `intra_op_threads`; e.g. 4 sessions of 4 threads on 16 cores). Sessions
of one thread run AlexNet-ACmix's feature layers in chunks of 16 images, as the service does
(runtime/batch_chunks.py; the plain AlexNet has no attention and runs as written); --whole-batch
runs them on the whole batch, as before session 23.
Prints the CPU, images/s per batch size (medians over the rounds) and the ratios: the median of
the rounds' own ratios, with their quartiles, which show how far one run's figure can move on the
machine (more --seconds and --rounds narrow them); writes build/bench/onnx_runtime.json.
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

from export.errors import ExportError
from model import paths
from model.cli import command, one_line_errors, positive_float, positive_int
from model.data import DataError
from model.files import writable
from model.spec import INPUT_NAME, OUTPUT_NAME
from runtime.artifacts import onnx_metadata
from runtime.backend import BackendError
from runtime.cpu import cpu_info, describe


def export_plain_alexnet(folder: Path) -> Path:
    from export.onnx_export import export_onnx
    from model.runtime import import_paddle

    paddle = import_paddle()
    from model.alexnet import build_model

    paddle.seed(0)
    weights = folder / "alexnet.pdparams"
    paddle.save(build_model("alexnet").state_dict(), str(weights))
    return export_onnx(weights, folder / "alexnet.onnx", arch="alexnet")


def median_rate(session, x: np.ndarray, seconds: float) -> float:
    """Images per second of `session` on the batch `x` for `seconds`, after one warm-up call: the batch
    over its median call time."""
    session.run([OUTPUT_NAME], {INPUT_NAME: x})
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        started = time.perf_counter()
        session.run([OUTPUT_NAME], {INPUT_NAME: x})
        times.append(time.perf_counter() - started)
    return len(x) / statistics.median(times)


def measure(sessions: dict[str, list], batch: int, seconds: float, rounds: int = 4) -> dict[str, list[float]]:
    """Images per second per model and round, whose sessions all run at once (one Python thread each:
    ONNX Runtime's run releases the GIL), the sum of their median_rate; in `rounds` short rounds that
    take the models in turn, so that machine load hits all alike within a round."""
    from concurrent.futures import ThreadPoolExecutor

    x = np.random.default_rng(0).standard_normal((batch, 3, 128, 128)).astype(np.float32)
    rates = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, group in sessions.items():
            with ThreadPoolExecutor(len(group)) as pool:
                rates[name].append(sum(pool.map(lambda session: median_rate(session, x, seconds / rounds), group)))
    return rates


def paired_ratio(numerator: list[float], denominator: list[float]) -> tuple[float, float, float]:
    """(median, lower quartile, upper quartile) of the per-round ratios: each round's two figures were
    measured within a second of each other, so a drift of the machine's speed between rounds cancels."""
    ratios = sorted(a / b for a, b in zip(numerator, denominator, strict=True))
    if len(ratios) == 1:
        return ratios[0], ratios[0], ratios[0]
    low, _, high = statistics.quantiles(ratios, n=4, method="inclusive")
    return statistics.median(ratios), low, high


def spread(median: float, quartiles) -> str:
    return f"{median:.2f} ({quartiles[0]:.2f}-{quartiles[1]:.2f})"


@one_line_errors(BackendError, DataError, ExportError)
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.onnx_runtime", description=__doc__.split("\n\n")[0])
    parser.add_argument("--onnx", default=paths.ONNX, help="AlexNet-ACmix, fp32")
    parser.add_argument("--batches", type=positive_int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--seconds", type=positive_float, default=3.0, help="per model and batch size")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="ONNX Runtime intra-op threads per session (default: one per core)")
    parser.add_argument("--sessions", type=positive_int, default=1,
                        help="sessions per model running at once, as the service's processes do (figures: their total)")
    parser.add_argument("--rounds", type=positive_int, default=4,
                        help="rounds per batch size, each running every model in turn for seconds / rounds")
    parser.add_argument("--whole-batch", action="store_true",
                        help="with one thread, run AlexNet-ACmix's feature layers on the whole batch, not in chunks")
    parser.add_argument("--out", default="build/bench/onnx_runtime.json")
    args = parser.parse_args(argv)
    onnx_metadata(args.onnx)  # ValueError naming the file where it is missing or no ONNX
    out = writable(args.out)  # before the measurement, not after it

    from runtime.onnxruntime import SESSION_CONFIG, create_session

    print(f"CPU: {describe()}; {args.sessions} session(s) per model at once, ONNX Runtime threads per session: "
          f"{args.threads or 'one per core'}")
    from export.int8 import int8_beside

    int8 = int8_beside(args.onnx)
    with tempfile.TemporaryDirectory() as tmp:
        files = {"alexnet_acmix_fp32": Path(args.onnx), "alexnet_acmix_int8": int8,
                 "alexnet_fp32": export_plain_alexnet(Path(tmp))}
        sessions = {name: [create_session(path, args.threads, providers=["CPUExecutionProvider"],
                                          batch_chunks=not args.whole_batch)
                           for _ in range(args.sessions)] for name, path in files.items()}
        chunks = {name: group[0].batch_chunk for name, group in sessions.items()}
        print("feature layers in chunks of the batch (runtime/batch_chunks.py): "
              + ", ".join(f"{name} {chunk or 'no'}" for name, chunk in chunks.items()))
        rows = []
        for batch in tqdm(args.batches, desc="batch sizes"):
            rates = measure(sessions, batch, args.seconds, args.rounds)
            ratio = paired_ratio(rates["alexnet_acmix_fp32"], rates["alexnet_fp32"])
            speedup = paired_ratio(rates["alexnet_acmix_int8"], rates["alexnet_acmix_fp32"])
            rows.append({"batch": batch, **{f"{name}_img_s": statistics.median(r) for name, r in rates.items()},
                         "ratio": ratio[0], "ratio_quartiles": ratio[1:],
                         "int8_speedup": speedup[0], "int8_speedup_quartiles": speedup[1:]})
    print(f"{'batch':>5} {'ACmix fp32':>11} {'ACmix int8':>11} {'AlexNet fp32':>13} {'ACmix/AlexNet':>20} "
          f"{'int8/fp32':>20}   (ratios: median of {args.rounds} paired rounds, quartiles)")
    for row in rows:
        print(f"{row['batch']:>5} {row['alexnet_acmix_fp32_img_s']:>11.0f} {row['alexnet_acmix_int8_img_s']:>11.0f} "
              f"{row['alexnet_fp32_img_s']:>13.0f} {spread(row['ratio'], row['ratio_quartiles']):>20} "
              f"{spread(row['int8_speedup'], row['int8_speedup_quartiles']):>20}")
    results = {"cpu": cpu_info(), "session_config": SESSION_CONFIG, "sessions": args.sessions,
               "threads": args.threads, "batch_chunks": chunks, "rounds": args.rounds, "seconds": args.seconds, "rows": rows}
    out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(command(main))
