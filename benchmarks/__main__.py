"""make bench: every benchmark of the project in one run, figures to a results file and PNG plots.

    python -m benchmarks [--skip paddle ...] [--onnx PATH] [--seconds S]

1. Paddle CPU: training step against the previous training path, inference against the reference
   ACmix formulation (benchmarks/paddle_acmix.py).
2. ONNX Runtime CPU: AlexNet-ACmix fp32 and int8 against the plain AlexNet by batch size
   (benchmarks/onnx_runtime.py), in one session on every core and as the service's settings run it
   (its processes' sessions at once, their threads each: served_sessions); their top-1 on the
   held-out split, lossless and JPEG q75, where the data is present (benchmarks/precision_accuracy.py).
3. The service under load against the raw backend, by concurrency, and serving int8 at 64 clients
   (benchmarks/service_load.py).
4. Ray Serve with 2 replicas against the single FastAPI process (benchmarks/ray_vs_fastapi.py).
4b. The service's own ceiling on a trivial model, and the real model, with 1 and 2 server processes
   (benchmarks/service_ceiling.py).
5. On a GPU host with TensorRT: the fp32, fp16 and int8 engines by batch size (benchmarks/tensorrt_engines.py).

Every results file records the CPU it was measured on (runtime/cpu.py).

Writes build/bench/*.json, docs/bench/results.json and docs/bench/*.png (the README shows them).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

from export.errors import ExportError
from model import paths
from model.cli import command, one_line_errors, positive_float
from model.data import DataError
from runtime.backend import BackendError
from runtime.cpu import describe

DOCS = Path("docs/bench")
BUILD = Path("build/bench")


def cpu_line(cpu: dict) -> str:
    """The CPU a plot was measured on, wrapped to fit a plot's width (its vector extensions are many)."""
    import textwrap

    return "\n".join(textwrap.wrap(describe(cpu), 64))


def plot_throughput(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    rows = results["onnx_runtime"]["rows"]
    batches = [r["batch"] for r in rows]
    ax.plot(batches, [r["alexnet_acmix_fp32_img_s"] for r in rows], "o-", label="AlexNet-ACmix fp32, ONNX Runtime CPU")
    ax.plot(batches, [r["alexnet_acmix_int8_img_s"] for r in rows], "D-", label="AlexNet-ACmix int8, ONNX Runtime CPU")
    ax.plot(batches, [r["alexnet_fp32_img_s"] for r in rows], "s--", label="AlexNet fp32, ONNX Runtime CPU")
    for name, series in (results.get("tensorrt") or {}).get("engines", {}).items():
        ax.plot([r["batch"] for r in series], [r["img_s"] for r in series], "^-", label=f"AlexNet-ACmix, TensorRT {name}")
    ax.set(xscale="log", xlabel="batch size", ylabel="images / s", ylim=(0, None),
           title=f"Throughput by batch size and precision\n{cpu_line(results['onnx_runtime']['cpu'])}")
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_latency(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["service_load"]["runs"]
    concurrency = [r["concurrency"] for r in runs]
    fig, (ax_lat, ax_rps) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, style in (("p50_ms", "o-"), ("p95_ms", "s-"), ("p99_ms", "^-")):
        ax_lat.plot(concurrency, [r[key] for r in runs], style, label=key.removesuffix("_ms"))
    ax_lat.set(xlabel="concurrent clients", ylabel="latency (ms)", title="Service latency (single 32x32 JPEG uploads)")
    ax_rps.plot(concurrency, [r["throughput_rps"] for r in runs], "o-", label="service (req/s)")
    raw = results["service_load"]["raw_backend_img_s"]
    ax_rps.axhline(raw, color="gray", linestyle="--", label=f"raw backend, batch {results['service_load']['batch']}")
    ax_rps.axhline(0.6 * raw, color="gray", linestyle=":", label="0.6 x raw")
    ax_rps.set(xlabel="concurrent clients", ylabel="requests / s", title="Service throughput", ylim=(0, raw * 1.1))
    fig.suptitle(cpu_line(results["service_load"]["cpu"]))
    for ax in (ax_lat, ax_rps):
        ax.set_xscale("log", base=2)
        ax.set_xticks(concurrency, [str(c) for c in concurrency])
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_ceiling(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["service_ceiling"]["rows"]
    cases = sorted({(r["model"], r["kind"]) for r in rows}, key=lambda c: (c[0] != "trivial", c[1]))
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    width = 0.38
    for offset, workers in ((-width / 2, 1), (width / 2, 2)):
        values = [next(r["images_per_s"] for r in rows if (r["model"], r["kind"], r["workers"]) == (*c, workers))
                  for c in cases]
        bars = ax.bar([i + offset for i in range(len(cases))], values, width, label="1 process" if workers == 1 else f"{workers} processes")
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks(range(len(cases)), [f"{model} model\n{kind}" for model, kind in cases])
    ax.set(ylabel="images / s", title=f"Service ceiling, 64 connections\n{cpu_line(results['service_ceiling']['cpu'])}")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def served_sessions() -> list[str]:
    """benchmarks.onnx_runtime's arguments for ONNX Runtime as the service's settings run it on this
    machine (ACMIX_* environment included): one session per batch computed at once in all its
    processes, each with the threads the settings give a batch. Exact where each process computes one
    batch (several processes: on 2 cores by default 2 of 1 thread); a single process's two batches
    share its one session instead, which this approximates by two sessions."""
    from service.settings import Settings

    settings = Settings()
    workers = settings.resolved_workers("onnxruntime")
    sessions = workers * settings.batches_per_process(workers)
    return ["--sessions", str(sessions), "--threads", str(settings.threads_per_batch(workers))]


@one_line_errors(BackendError, DataError, ExportError)
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["paddle", "onnx_runtime", "accuracy", "service", "ray", "ceiling", "tensorrt"])
    parser.add_argument("--onnx", default=paths.ONNX, help="the model the service benchmark serves")
    parser.add_argument("--seconds", type=positive_float, default=10, help="per service load level and round")
    args = parser.parse_args(argv)

    from benchmarks import (
        onnx_runtime,
        paddle_acmix,
        precision_accuracy,
        ray_vs_fastapi,
        service_ceiling,
        service_load,
        tensorrt_engines,
    )

    # Before the first benchmark (Paddle's takes minutes), not when the first that serves it starts.
    if {"onnx_runtime", "accuracy", "service", "ray", "ceiling", "tensorrt"} - set(args.skip):
        from runtime.artifacts import onnx_metadata

        onnx_metadata(args.onnx)  # ValueError naming the file where it is missing or no ONNX
    if "accuracy" not in args.skip and not Path(paths.DATA).exists():
        print(f"{paths.DATA}: absent; the accuracy benchmark is skipped", file=sys.stderr)
        args.skip.append("accuracy")

    steps = [
        ("paddle", lambda: paddle_acmix.main(["--out", str(BUILD / "paddle_acmix.json")])),
        ("onnx_runtime", lambda: onnx_runtime.main(["--onnx", args.onnx, "--out", str(BUILD / "onnx_runtime.json")])),
        ("onnx_runtime", lambda: onnx_runtime.main(["--onnx", args.onnx, *served_sessions(),
                                                    "--out", str(BUILD / "onnx_runtime_served.json")])),
        ("accuracy", lambda: precision_accuracy.main(["--onnx", args.onnx,
                                                      "--out", str(BUILD / "precision_accuracy.json")])),
        ("service", lambda: service_load.main(["--onnx", args.onnx, "--seconds", str(args.seconds),
                                               "--concurrency", "8", "16", "32", "64", "128",
                                               "--out", str(BUILD / "service_load.json")])),
        ("service", lambda: service_load.main(["--onnx", args.onnx, "--precision", "int8", "--seconds", str(args.seconds),
                                               "--concurrency", "64", "--out", str(BUILD / "service_load_int8.json")])),
        ("ray", lambda: ray_vs_fastapi.main(["--onnx", args.onnx, "--seconds", str(args.seconds),
                                             "--out", str(BUILD / "ray_vs_fastapi.json")])),
        ("ceiling", lambda: service_ceiling.main(["--onnx", args.onnx, "--seconds", str(args.seconds),
                                                  "--out", str(BUILD / "service_ceiling.json")])),
        ("tensorrt", lambda: tensorrt_engines.main(["--onnx", args.onnx, "--out", str(BUILD / "tensorrt.json")])),
    ]
    for name, run in tqdm([s for s in steps if s[0] not in args.skip], desc="benchmarks", unit="benchmark"):
        code = run()
        if code not in (0, None) and name != "tensorrt":
            print(f"error: the {name} benchmark failed", file=sys.stderr)
            return 2

    results = {}
    for key, file in (("paddle_acmix", "paddle_acmix.json"), ("onnx_runtime", "onnx_runtime.json"),
                      ("onnx_runtime_served", "onnx_runtime_served.json"),
                      ("precision_accuracy", "precision_accuracy.json"),
                      ("service_load", "service_load.json"), ("service_load_int8", "service_load_int8.json"),
                      ("ray_vs_fastapi", "ray_vs_fastapi.json"),
                      ("service_ceiling", "service_ceiling.json"), ("tensorrt", "tensorrt.json")):
        if (BUILD / file).is_file():
            results[key] = json.loads((BUILD / file).read_text())
    DOCS.mkdir(parents=True, exist_ok=True)
    (DOCS / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    if "onnx_runtime" in results:
        plot_throughput(results, DOCS / "throughput_vs_batch.png")
    if "service_load" in results:
        plot_latency(results, DOCS / "service_latency_vs_concurrency.png")
    if "service_ceiling" in results:
        plot_ceiling(results, DOCS / "service_ceiling.png")
    print(f"wrote {DOCS / 'results.json'} and the plots in {DOCS}/", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(command(main))
