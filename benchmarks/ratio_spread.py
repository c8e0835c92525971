"""How far one run's figures move on this machine: benchmarks.onnx_runtime several times in a row.

    python -m benchmarks.ratio_spread [--runs 10] [--batches 32 128] [--seconds 3] [--onnx PATH]
                                      [--out build/bench/ratio_spread.json]

Each run measures two configurations, one after the other: one session with a thread per core
(benchmarks.onnx_runtime's default) and ONNX Runtime as the service's settings run it on this
machine (benchmarks.__main__.served_sessions: on 2 cores 2 sessions of 1 thread). One run's
quartiles show the noise within its ~20 s; a virtual machine's speed also drifts between runs (its
host's other tenants share the caches and memory), by more: on session 21's AMD EPYC Zen 5 the
fp32 ratio at batch 128 ranged over 0.79-0.91 in ten runs, against quartiles of +-0.02-0.04 within
each. Prints, per configuration and batch size, the median and range over the runs of AlexNet-ACmix
/ AlexNet (fp32) and int8 / fp32, beside the issue's targets; writes the runs and that summary to
--out and a plot of every run's ratios beside it (.png).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from tqdm import tqdm

from export.errors import ExportError
from model import paths
from model.cli import command, one_line_errors, positive_float, positive_int
from model.data import DataError
from model.files import writable
from runtime.artifacts import onnx_metadata
from runtime.backend import BackendError
from runtime.cpu import cpu_info

# The targets of the inference-speed issue, drawn on the plot.
TARGETS = {"ratio": 0.85, "int8_speedup": 1.8}
FIGURES = {"ratio": "AlexNet-ACmix / AlexNet, fp32", "int8_speedup": "AlexNet-ACmix int8 / fp32"}


def configurations() -> dict[str, list[str]]:
    """benchmarks.onnx_runtime's arguments per configuration, named as sessions x threads."""
    from benchmarks.__main__ import served_sessions
    from model.runtime import available_cores

    served = served_sessions()
    return {f"1 x {available_cores()}": [], f"{served[1]} x {served[3]} (as served)": served}


def summarize(runs: list[dict]) -> dict:
    """{configuration: {batch: {figure: {"median", "low", "high", "runs"}}}} over the runs' rows."""
    values: dict = {}
    for run in runs:
        for row in run["rows"]:
            for figure in FIGURES:
                values.setdefault(run["configuration"], {}).setdefault(row["batch"], {}).setdefault(figure, []).append(
                    row[figure])
    return {configuration: {batch: {figure: {"median": statistics.median(v), "low": min(v), "high": max(v), "runs": v}
                                    for figure, v in figures.items()}
                            for batch, figures in batches.items()}
            for configuration, batches in values.items()}


def plot(summary: dict, cpu: dict, runs: int, path: Path) -> None:
    """Every run's figures by batch size, one colour per configuration, the targets as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks.__main__ import cpu_line

    fig, axes = plt.subplots(1, len(FIGURES), figsize=(10, 4.6))
    batches = sorted({batch for by_batch in summary.values() for batch in by_batch})
    for ax, figure in zip(axes, FIGURES, strict=True):
        for offset, (configuration, by_batch) in enumerate(summary.items()):
            for position, batch in enumerate(batches):
                values = by_batch.get(batch, {}).get(figure, {}).get("runs", [])
                x = [position + (offset - 0.5) * 0.3] * len(values)
                ax.plot(x, values, "o", alpha=0.6, color=f"C{offset}", label=configuration if position == 0 else None)
        ax.axhline(TARGETS[figure], color="black", linestyle="--", linewidth=1, label=f"target {TARGETS[figure]}")
        ax.set_xticks(range(len(batches)), [str(b) for b in batches])
        ax.set(xlabel="batch size", title=FIGURES[figure])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{runs} runs of benchmarks.onnx_runtime in a row, sessions x threads\n{cpu_line(cpu)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@one_line_errors(BackendError, DataError, ExportError)
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ratio_spread", description=__doc__.split("\n\n")[0])
    parser.add_argument("--onnx", default=paths.ONNX, help="AlexNet-ACmix, fp32")
    parser.add_argument("--runs", type=positive_int, default=10)
    parser.add_argument("--batches", type=positive_int, nargs="+", default=[32, 128])
    parser.add_argument("--seconds", type=positive_float, default=3.0, help="per model and batch size, in each run")
    parser.add_argument("--out", default="build/bench/ratio_spread.json")
    args = parser.parse_args(argv)
    onnx_metadata(args.onnx)  # ValueError naming the file where it is missing or no ONNX
    out = writable(args.out)  # before the runs, not after them

    from benchmarks import onnx_runtime

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for index in tqdm(range(args.runs), desc="runs", unit="run"):
            for configuration, extra in configurations().items():
                result = Path(tmp) / "run.json"
                code = onnx_runtime.main(["--onnx", args.onnx, "--batches", *map(str, args.batches),
                                          "--seconds", str(args.seconds), *extra, "--out", str(result)])
                if code:
                    return code
                runs.append({"run": index + 1, "configuration": configuration,
                             **json.loads(result.read_text())})
    summary = summarize(runs)
    print(f"{args.runs} runs: median (lowest-highest) of each run's ratio")
    print(f"{'sessions x threads':<28} {'batch':>5} {FIGURES['ratio']:>32} {FIGURES['int8_speedup']:>28}")
    for configuration, by_batch in summary.items():
        for batch, figures in by_batch.items():
            cells = [onnx_runtime.spread(f["median"], (f["low"], f["high"])) for f in figures.values()]
            print(f"{configuration:<28} {batch:>5} {cells[0]:>32} {cells[1]:>28}")
    print(f"targets: {TARGETS['ratio']} and {TARGETS['int8_speedup']} at batch 32 and 128")
    cpu = cpu_info()
    out.write_text(json.dumps({"cpu": cpu, "runs": runs, "summary": summary}, indent=2) + "\n")
    plot(summary, cpu, args.runs, out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(command(main))
