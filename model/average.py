"""Average a warm restart's last weights with the weights it started from, into a run folder to ship.

    python -m model.average --run runs/finetune [--out runs/averaged] [--data D] [--split-file S]

A warm restart (`python -m model.train --init-weights W`) stays in the basin of W; the uniform
average, parameter by parameter, of W and of the restart's weights after its last epoch (its
weight average, last.pdema, when it kept one) lies between the two. The average is validated on the
held-out split and written as a run folder that `python -m model.ship --run` takes: best.pdparams
(subnormal values set to zero), curves.png, and metrics.json, the restart's record with an
"average" entry naming both sources (path, SHA-256, their validation accuracy) and its own.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from model import paths
from model.cli import command, one_line_errors
from model.data import DataError
from model.files import sha256_file
from model.train import parent_record, read_run_record, recorded_config


def restart_sources(run: Path) -> tuple[dict, Path, str, Path]:
    """The restart's record, the weights it started from and their SHA-256, and its weights after the
    last epoch; DataError naming what is missing where `run` is not a finished warm restart."""
    record = read_run_record(run / "metrics.json")
    config = recorded_config(record)
    if not config.get("init_weights") or not record.get("parent"):
        raise DataError(f"{run}: not a warm restart (no --init-weights and parent run in its record); "
                        "nothing to average with")
    if len(record["history"]) < config["epochs"]:
        raise DataError(f"{run}: {len(record['history'])} of {config['epochs']} epochs trained; "
                        "average a finished restart (make train RUN=... resumes it)")
    start = Path(config["init_weights"])
    end = run / ("last.pdema" if config.get("ema") else "last.pdparams")
    for path in (start, end, run / "curves.png"):
        if not path.is_file():
            raise DataError(f"{path}: missing")
    # Shipped weights get replaced: the file must still hold what the restart started from.
    recorded, digest = record.get("init_weights_sha256"), sha256_file(start)
    if (recorded and digest != recorded) or parent_record(start) != record["parent"]:
        raise DataError(f"{start}: no longer the weights {run} started from (other weights were saved there "
                        "since); nothing to average with")
    return record, start, digest, end


def average_state(first: dict, second: dict) -> dict:
    """The uniform average of two state dicts of one network, in float64, then float32 with subnormal
    values set to zero; ValueError where their parameters differ."""
    import numpy as np

    from model.subnormals import flush_subnormals

    if first.keys() != second.keys():
        raise ValueError(f"the two weights hold different parameters: {sorted(first.keys() ^ second.keys())[:3]}")
    averaged = {}
    for name, a in first.items():
        a, b = np.asarray(a, dtype=np.float64), np.asarray(second[name], dtype=np.float64)
        if a.shape != b.shape:
            raise ValueError(f"{name}: shapes {a.shape} and {b.shape} differ")
        averaged[name] = flush_subnormals(((a + b) / 2).astype(np.float32))
    return averaged


def average_run(run: Path, out: Path, data: str, split_file: str, split: str = "val") -> dict:
    """Write the averaged run folder `out` (see the module's text); returns its record. Everything is
    checked and validated before `out` is written."""
    import tempfile

    import paddle

    from model.evaluate import evaluate
    from model.files import replacing
    from model.predict import load_weights

    record, start, start_sha256, end = restart_sources(run)
    arch = recorded_config(record)["arch"]
    states = [load_weights(arch, str(path)).state_dict() for path in (start, end)]  # ValueError naming a bad file
    averaged = average_state(*({k: v.numpy() for k, v in state.items()} for state in states))
    with tempfile.TemporaryDirectory(prefix="average.") as tmp:
        weights = Path(tmp) / "best.pdparams"
        paddle.save({name: paddle.to_tensor(value) for name, value in averaged.items()}, str(weights))
        accuracy = evaluate(str(weights), data, split, split_file, Path(tmp) / "confusion_matrix.png")["accuracy"]
        last = record["history"][-1]
        record["average"] = {
            "run": str(run),
            "sources": [
                {"path": str(start), "sha256": start_sha256, "val_accuracy": record["parent"]["best"]["val_accuracy"],
                 "epoch": record["parent"]["best"]["epoch"], "of": "parent"},
                {"path": str(end), "sha256": sha256_file(end), "val_accuracy": last["val_accuracy"],
                 "epoch": last["epoch"], "of": "run"},
            ],
            "val_accuracy": accuracy,
        }
        record["best"] = {"epoch": last["epoch"], "val_accuracy": accuracy}
        out.mkdir(parents=True, exist_ok=True)
        shutil.move(weights, out / "best.pdparams")
    shutil.copyfile(run / "curves.png", out / "curves.png")
    with replacing(out / "metrics.json") as tmp:
        Path(tmp).write_text(json.dumps(record, indent=2) + "\n")
    return record


@one_line_errors(DataError)
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.average", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a finished warm restart's folder")
    parser.add_argument("--out", default=None, help="the averaged run's folder (default: RUN_averaged)")
    parser.add_argument("--data", default=paths.DATA, help="the lossless images, for the validation figure")
    parser.add_argument("--split-file", default=paths.SPLIT_FILE)
    args = parser.parse_args(argv)
    run = Path(args.run)
    out = Path(args.out) if args.out else run.with_name(f"{run.name}_averaged")
    if out.resolve() == run.resolve():
        raise ValueError(f"{out}: the averaged run needs its own folder, not the restart's")
    record = average_run(run, out, args.data, args.split_file)
    first, second = record["average"]["sources"]
    print(f"averaged {first['path']} ({first['val_accuracy']:.4f}) and {second['path']} ({second['val_accuracy']:.4f}):"
          f" validation accuracy {record['average']['val_accuracy']:.4f}; python -m model.ship --run {out}")
    return 0


if __name__ == "__main__":
    sys.exit(command(main))
