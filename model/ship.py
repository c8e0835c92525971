"""Ship a training run's best weights: into model/weights/, evaluated, calibrated, with their model card.

    python -m model.ship [--run runs/alexnet_acmix] [--data D] [--jpeg-data J] [--proxies runs/proxy/*]

Copies the run's best.pdparams to model/weights/alexnet_acmix.pdparams (subnormal values set to
zero), its curves.png and metrics.json beside it; evaluates the weights on the held-out split of
the lossless images and of their JPEG q75 copy (per-class accuracy, confusion-matrix PNG); fits the
softmax temperature on the lossless split (calibration.json, reliability.png; model/calibration.py);
records the recipe search of --proxies (recipe_search.json, kept when not given again); and writes
model/weights/README.md from those records, so that the card always describes the weights next
to it. Commit the result once per improvement.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

from model import paths
from model.calibration import CALIBRATION_FILE, calibrate, plot_reliability
from model.cli import command, fail
from model.data import DataError
from model.evaluate import evaluate
from model.train import (
    RECIPE_FLAGS,
    SHIPPED_METRICS,
    SHIPPED_WEIGHTS,
    TrainConfig,
    lineage,
    read_run_record,
    recorded_config,
)

WEIGHTS_DIR = paths.WEIGHTS_DIR
TARGET_ACCURACY = 0.85
RECIPE_SEARCH = "recipe_search.json"
JPEG_CONFUSION = Path("build/confusion_matrix_jpeg.png")  # the JPEG copy's, not shipped
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth")


def epoch_table(history: list[dict]) -> str:
    """One row per epoch; a run that keeps a weight average shows the trained weights' accuracy beside it."""
    averaged = any("raw_val_accuracy" in h for h in history)
    rows = [
        "| epoch | lr at end | train loss | train acc (augmented) | val loss | val acc "
        + ("(weight average) | val acc (trained weights) " if averaged else "") + "| minutes |",
        "|---|---|---|---|---|---|" + ("---|" if averaged else "") + "---|",
    ]
    for h in history:
        raw = f" {h['raw_val_accuracy']:.4f} |" if averaged else ""
        rows.append(
            f"| {h['epoch']} | {h['lr']:.2e} | {h['train_loss']:.4f} | {h['train_accuracy']:.4f} | "
            f"{h['val_loss']:.4f} | {h['val_accuracy']:.4f} |{raw} {h['epoch_seconds'] / 60:.1f} |"
        )
    return "\n".join(rows)


def status_line(metrics: dict, accuracy: float) -> str:
    history, planned, best = metrics["history"], metrics["config"]["epochs"], metrics["best"]["epoch"]
    parent = metrics.get("parent")
    if parent:
        run = (f"a run of {planned} epochs started from the best weights (epoch {parent['best']['epoch']}, "
               f"validation accuracy {parent['best']['val_accuracy']:.4f}) of a run of {parent['config']['epochs']} epochs")
    else:
        run = f"a run of {planned} epochs"
    reached = accuracy >= TARGET_ACCURACY
    if metrics.get("average"):
        kept = "weight average" if metrics["config"].get("ema") else "weights"
        return (f"Complete: the uniform average of the best weights (epoch {parent['best']['epoch']}, validation "
                f"accuracy {parent['best']['val_accuracy']:.4f}) of a run of {parent['config']['epochs']} epochs and "
                f"of the {kept} after the last epoch ({history[-1]['epoch']}) of a run of {planned} epochs started "
                f"from them; {'at' if reached else 'below'} the target.")
    if len(history) < planned:
        return (f"**Work in progress:** the best weights (epoch {best}) of the first {len(history)} epochs of "
                f"{run}; it goes on in later sessions with `make train`.")
    return f"Complete: the best weights (epoch {best}) of {run}; {'its best weights' if reached else 'below the target'}."


def augmentation_text(config: dict) -> str:
    jpeg = f"JPEG re-encoding (quality 40–95) of {config['jpeg']:.0%} of the images, " if config["jpeg"] else ""
    cutmix = f", CutMix of {config['cutmix']:.0%} of the batches" if config.get("cutmix") else ""
    if config["augment"] == "translate":
        erasing = f", random erasing ({config['erasing']:.0%})" if config["erasing"] else ""
        return (f"at 32×32: {jpeg}random translation by up to {config['pad']} pixels (reflect padding), "
                f"horizontal flip{erasing}{cutmix}; then the bilinear resize to 128 that inference uses")
    rotation = f"rotation ±{config['rotation']:g}°" if config["rotation"] else "no rotation"
    return (f"{jpeg}resize 130, color jitter {config['jitter']:g} (brightness, contrast, saturation), random "
            f"resized crop 128 (scale {config['crop_scale_min']:g}–1), horizontal flip, {rotation}{cutmix}")


OPTIMIZER_NAMES = {"adam": "Adam (L2 weight decay)", "adamw": "AdamW (decoupled weight decay)",
                   "sgd": "SGD with Nesterov momentum"}


def recipe_text(config: dict) -> str:
    warmup = f"{config['warmup_epochs']:g} epochs of linear warmup, then " if config["warmup_epochs"] else ""
    clip = f", gradient norm clipped at {config['clip_grad_norm']:g}" if config["clip_grad_norm"] else ""
    average = (f"; the run validates and keeps an exponential moving average of the weights (decay "
               f"{config['ema']:g} per step)" if config.get("ema") else "")
    subset = (f"; trained on {config['train_per_class']:,} images of each class of the training split"
              if config.get("train_per_class") else "")
    return (f"{OPTIMIZER_NAMES[config['optimizer']]}, lr {config['lr']:g} with {warmup}cosine decay per step over "
            f"the {config['epochs']} epochs, weight decay {config['weight_decay']:g}{clip}, label smoothing "
            f"{config['label_smoothing']:g}, batch {config['batch_size']} (drop last), dropout {config['dropout']:g}; augmentation: "
            f"{augmentation_text(config)}; seed {config['seed']}{average}{subset}")


def train_command(config: dict, out: Path) -> str:
    """The `python -m model.train` command line of a run's configuration, into `out`."""
    defaults = asdict(TrainConfig())
    command = ["python -m model.train"]
    if out != Path("runs") / config["arch"]:
        command.append(f"--out {out}")
    for name in RECIPE_FLAGS:
        if config[name] != defaults[name]:
            value = f"{config[name]:g}" if isinstance(config[name], float) else config[name]
            command.append(f"--{name.replace('_', '-')} {value}")
    return " ".join(command)


def summarize_proxies(folders: list[Path]) -> list[dict]:
    """One row per proxy run (recipe search): its name, recipe, epochs, best validation accuracy, minutes."""
    rows = []
    for folder in folders:
        record = read_run_record(folder / "metrics.json")
        config = recorded_config(record)
        rows.append({
            "name": folder.name,
            "recipe": recipe_text(config),
            "command": train_command(config, folder),
            "epochs": len(record["history"]),
            "val_accuracy": record["best"]["val_accuracy"],
            "val_accuracy_by_epoch": [h["val_accuracy"] for h in record["history"]],
            "minutes": sum(h["epoch_seconds"] for h in record["history"]) / 60,
        })
    return rows


def proxy_table(rows: list[dict]) -> str:
    if not rows:
        return "No recipe search is recorded for these weights."
    lines = ["| proxy run | recipe | epochs | validation accuracy by epoch | best | minutes |", "|---|---|---|---|---|---|"]
    for row in rows:
        by_epoch = ", ".join(f"{a:.4f}" for a in row["val_accuracy_by_epoch"])
        minutes = "not recorded" if row.get("minutes") is None else f"{row['minutes']:.0f}"
        lines.append(f"| `{row['name']}` | {row['recipe']} | {row['epochs']} | {by_epoch} | **{row['val_accuracy']:.4f}** "
                     f"| {minutes} |")
    return "\n".join(lines)


def calibration_text(calibration: dict | None) -> str:
    if calibration is None:
        return "Not calibrated: the service's confidence is the plain softmax."
    return (f"Temperature **T = {calibration['temperature']:.4f}**, fitted on the {calibration['n']:,} validation "
            f"images by least negative log-likelihood; the service's `confidence` and `probability` are "
            f"softmax(logits / T) (the ONNX records T), `logits` stay raw.\n\n"
            f"| expected calibration error ({calibration['bins']} bins) | value |\n|---|---|\n"
            f"| before (T = 1) | {calibration['ece_before']:.4f} |\n"
            f"| after, T fitted on all of the split | **{calibration['ece_after']:.4f}** |\n"
            f"| after, T fitted on each half, measured on the other half | {calibration['ece_after_cross_fitted']:.4f} |"
            f"\n\n![reliability diagram](reliability.png)")


def command_chain(configs: list[dict], run: Path, average: dict | None) -> str:
    """The commands that remake the weights of `run`: each training run in turn, from the weights the
    one before it left. A run started from the shipped weights (SHIPPED_WEIGHTS) followed its
    predecessor's `model.ship` (that predecessor's folder is not recorded: it is named here); one
    started from a run's best.pdparams followed that run, in its folder. An averaged run ends with
    `model.average` of its restart."""
    commands = []
    for number, config in enumerate(configs, start=1):
        start = Path(configs[number]["init_weights"]) if number < len(configs) else None
        if start is None:
            out = Path(average["run"]) if average else run
        elif start.name == SHIPPED_WEIGHTS:
            out = Path("runs") / f"{config['arch']}_run{number}"
        else:
            out = start.parent
        commands.append(train_command(config, out))
        if start is not None and start.name == SHIPPED_WEIGHTS:
            commands.append(f"python -m model.ship --run {out}")
    if average:
        commands.append(f"python -m model.average --run {average['run']} --out {run}")
    return "\n".join([*commands, f"python -m model.ship --run {run}"])


def average_text(average: dict | None, names: list[str]) -> str:
    """What an averaged run averaged, from its record: each source's validation accuracy and the average's."""
    if not average:
        return ""
    parent, restart = average["sources"]
    return (f"\n\nThe shipped weights are the uniform average, parameter by parameter, of two sets of weights "
            f"(`python -m model.average`), validated on the same split:\n\n"
            f"| weights | validation accuracy (lossless) |\n|---|---|\n"
            f"| the best of {names[-2]} (epoch {parent['epoch']}), where {names[-1]} started "
            f"(SHA-256 `{parent['sha256'][:12]}`) | {parent['val_accuracy']:.4f} |\n"
            f"| {names[-1]} after its last epoch ({restart['epoch']}; SHA-256 `{restart['sha256'][:12]}`) | "
            f"{restart['val_accuracy']:.4f} |\n"
            f"| their average (shipped) | **{average['val_accuracy']:.4f}** |")


def model_card(metrics: dict, evaluation: dict, paddle_version: str, run: Path, jpeg: dict | None = None,
               calibration: dict | None = None, proxies: list[dict] | None = None) -> str:
    config, history, best = recorded_config(metrics), metrics["history"], metrics["best"]
    parent = metrics.get("parent")
    records = lineage(metrics)
    names = ["the run"] if len(records) == 1 else [
        f"the {ORDINALS[i]} run" if i < len(ORDINALS) else f"run {i + 1}" for i in range(len(records))]
    stages = [(record, recorded_config(record), name) for record, name in zip(records, names, strict=True)]
    recent = sorted(h["epoch_seconds"] for h in history[-5:])
    minutes = recent[len(recent) // 2] / 60
    per_class = "\n".join(
        f"| {name} | {value:.4f} | {jpeg['per_class'][name]:.4f} |" if jpeg else f"| {name} | {value:.4f} | – |"
        for name, value in evaluation["per_class"].items() if value is not None)
    trained = " + ".join(f"{len(record['history'])} / {cfg['epochs']}" for record, cfg, _ in stages)
    recipes = "\n".join(f"* Recipe of {name}: {recipe_text(cfg)}." for _, cfg, name in stages)
    tables = "\n\n".join(f"Epochs of {name}:\n\n{epoch_table(record['history'])}" for record, _, name in stages)
    average = metrics.get("average")
    commands = command_chain([cfg for _, cfg, _ in stages], run, average)
    best_text = (f"averaged: epoch {average['sources'][0]['epoch']} of {names[-2]} with epoch "
                 f"{average['sources'][1]['epoch']} of {names[-1]}" if average else
                 f"best: epoch {best['epoch']}{f' of {names[-1]}' if parent else ''}")
    data = metrics.get("data") or Path(evaluation["data"]).name
    jpeg_row = (f"| validation accuracy, JPEG q75 copy of the same images (`{Path(jpeg['data']).name}`) | "
                f"{jpeg['accuracy']:.4f} ({(jpeg['accuracy'] - evaluation['accuracy']) * 100:+.2f} points) |"
                if jpeg else "| validation accuracy, JPEG q75 copy | not measured (archive absent) |")
    return f"""# Model card: `alexnet_acmix.pdparams`

AlexNet-ACmix (7,051,159 parameters, `model/alexnet.py`) for CIFAR-10 at 128×128 input, trained
in PaddlePaddle {paddle_version} on this project's 2-core CPU machine.
{status_line(metrics, evaluation["accuracy"])} Target: validation accuracy ≥ {TARGET_ACCURACY}
(the reference reports 0.818 after 50 epochs on a V100, selected on the test split).

| figure | value |
|---|---|
| validation accuracy ({evaluation["n"]:,} held-out training images, lossless) | **{evaluation["accuracy"]:.4f}** |
{jpeg_row}
| epochs trained / planned | {trained} ({best_text}) |
| calibration: expected calibration error after / before | {f"{calibration['ece_after']:.4f} / {calibration['ece_before']:.4f}" if calibration else "–"} |
| test accuracy | measured independently (the test split is withheld here) |

## How it was trained

```sh
{commands}
```

* Data: `{data}` (the 50,000 CIFAR-10 training images), read in place. 5,000 of them (500 per
  class, seed {config["seed"]}) are held out for validation and model selection and never trained
  on: `model/weights/val_split.json` lists them (by name, so in either archive).
{recipes}
  Per-epoch seeds make a resumed run draw the same batches. Parameters are saved with subnormal
  values set to zero. Since session 14, training computes the translation recipe's resize exactly,
  in float, folded into the first convolution (`model/source_stem.py`); inference's Pillow resize
  rounds it to whole grey levels (at most 1 apart).
* Speed: about {minutes:.0f} min per epoch lately (median of the last {len(recent)}) on 2 CPU cores.{average_text(average, names)}

## Recipe search

Short proxy runs on the same split, each the recipe's own schedule compressed into the proxy's
epochs (`python -m model.ship --proxies ...` records them). Minutes include validation and
whatever else the machine ran meanwhile.

{proxy_table(proxies or [])}

## Calibrated confidence

{calibration_text(calibration)}

## Figures

Evaluated with `python -m model.evaluate --json` (these weights, the held-out split) on the
lossless images and on their JPEG q75 copy:

| class | accuracy (lossless) | accuracy (JPEG q75) |
|---|---|---|
{per_class}

![learning curves](learning_curves.png)
![confusion matrix](confusion_matrix.png)

{tables}

Training accuracy is measured on augmented batches, with dropout, so it runs below validation
accuracy. Minutes include validation, and time the machine spent on other work meanwhile.
"""


def copy_weights(source: Path, target: Path) -> None:
    """The weights with subnormal values set to zero (model/subnormals.py), written whole."""
    import paddle

    from model.files import replacing
    from model.subnormals import flush_subnormals

    state = paddle.load(str(source))
    clean = {key: paddle.to_tensor(flush_subnormals(value.numpy())) for key, value in state.items()}
    with replacing(target) as tmp:
        paddle.save(clean, tmp)


def ship(run: Path, data: str, split_file: str, out: Path = WEIGHTS_DIR, split: str = "val",
         jpeg_data: str | None = None, proxies: list[Path] | None = None) -> dict:
    """Copy the run's best weights into `out`, evaluate and calibrate them, write the card; returns
    the evaluation on `data`. Everything is checked and computed first: a bad input (DataError or
    ValueError naming it), or a failure while the files are made, leaves the weights and card shipped
    before untouched."""
    import shutil
    import tempfile

    import numpy as np
    import paddle

    from model.predict import load_weights

    metrics_file, best = run / "metrics.json", run / "best.pdparams"
    for path in (metrics_file, best, run / "curves.png"):
        if not path.is_file():
            raise DataError(f"{path}: missing; is {run} a training run (python -m model.train --out {run})?")
    metrics = read_run_record(metrics_file)
    load_weights(recorded_config(metrics)["arch"], best)  # ValueError naming the file if it is not the run's network
    if not Path(data).exists():
        raise DataError(f"{data}: no such data set")
    rows = summarize_proxies(proxies) if proxies else None
    out.mkdir(parents=True, exist_ok=True)
    for left in out.glob(".ship.*"):  # of a ship killed while it made its files (SIGKILL, OOM)
        shutil.rmtree(left, ignore_errors=True)
    # Every file is made in a folder inside `out` first, then renamed into place one after the other
    # (milliseconds), the weights last: a failure or an interrupt before that leaves the weights and
    # card shipped before as they were.
    with tempfile.TemporaryDirectory(prefix=".ship.", dir=out) as staging:
        tmp = Path(staging)
        weights = tmp / SHIPPED_WEIGHTS
        copy_weights(best, weights)
        evaluation = evaluate(str(weights), data, split, split_file, tmp / "confusion_matrix.png",
                              keep_logits=True)
        jpeg = None
        if jpeg_data and Path(jpeg_data).exists():
            jpeg = evaluate(str(weights), jpeg_data, split, split_file, tmp / JPEG_CONFUSION.name)
        logits, labels = np.asarray(evaluation.pop("logits")), np.asarray(evaluation.pop("labels"))
        calibration = calibrate(logits, labels)
        plot_reliability(logits, labels, calibration["temperature"], tmp / "reliability.png")

        evaluation.update(weights=str(out / SHIPPED_WEIGHTS), confusion_png=str(out / "confusion_matrix.png"))
        if jpeg:
            jpeg["weights"] = evaluation["weights"]
        shutil.copyfile(run / "curves.png", tmp / "learning_curves.png")
        shutil.copyfile(metrics_file, tmp / SHIPPED_METRICS)
        (tmp / CALIBRATION_FILE).write_text(json.dumps(calibration, indent=2) + "\n")
        search = out / RECIPE_SEARCH
        if rows:
            (tmp / RECIPE_SEARCH).write_text(json.dumps(rows, indent=2) + "\n")
        else:
            rows = json.loads(search.read_text()) if search.is_file() else []
        (tmp / "README.md").write_text(model_card(metrics, evaluation, paddle.__version__, run, jpeg, calibration, rows))

        if jpeg:  # not shipped (build/ is not committed): beside the card's figures for a look
            JPEG_CONFUSION.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(tmp / JPEG_CONFUSION.name, JPEG_CONFUSION)
        for made in sorted(tmp.iterdir(), key=lambda path: path.name == SHIPPED_WEIGHTS):
            os.replace(made, out / made.name)
    evaluation["jpeg"] = jpeg
    evaluation["calibration"] = calibration
    return evaluation


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.ship", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="runs/alexnet_acmix", help="the training run's folder")
    parser.add_argument("--data", default=paths.DATA, help="the lossless images (selection, calibration)")
    parser.add_argument("--jpeg-data", default=paths.JPEG_DATA, help="their JPEG q75 copy (skipped when absent)")
    parser.add_argument("--split-file", default=paths.SPLIT_FILE)
    parser.add_argument("--proxies", nargs="*", default=None, help="proxy runs of the recipe search, for the card")
    args = parser.parse_args(argv)
    try:
        evaluation = ship(Path(args.run), args.data, args.split_file, jpeg_data=args.jpeg_data,
                          proxies=[Path(p) for p in args.proxies] if args.proxies else None)
    except (DataError, ValueError, OSError) as exc:
        return fail(exc)
    jpeg = f" (JPEG q75: {evaluation['jpeg']['accuracy']:.4f})" if evaluation["jpeg"] else ""
    print(f"shipped {args.run}/best.pdparams: validation accuracy {evaluation['accuracy']:.4f} on {evaluation['n']} "
          f"images{jpeg}; temperature "
          f"{evaluation['calibration']['temperature']:.4f}, ECE {evaluation['calibration']['ece_before']:.4f} -> "
          f"{evaluation['calibration']['ece_after']:.4f}; card: {WEIGHTS_DIR / 'README.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(command(main))
