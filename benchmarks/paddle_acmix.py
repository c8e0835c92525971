"""Paddle CPU: training and inference speed of model/alexnet.py against its baselines, in one run.

    python -m benchmarks.paddle_acmix [--batch 128] [--rounds 3] [--steps 5]

* Training: the training loop as `python -m model.train` runs it (batches augmented in a thread by
  model.train.train_batches, forward, backward, the optimizer) over 32x32 images, for the
  previous training path (benchmarks/previous_training.py: the eager forward and the reference
  augmentation at 128x128 before this work, in its process settings: MKL's AVX2 code path on AMD)
  and for the current one (model/alexnet.py, the translation augmentation at 32x32 with JPEG
  re-encoding, the first convolution computed from the 32x32 images by model/source_stem.py,
  model/runtime.py's settings). Seconds per step, in the steady state: the first
  WARMUP_STEPS of each process, which allocate Paddle's memory (1.3-1.5x slower), are not timed.
* Inference (eval, no grad): the reference notebook's ACmix formulation (model/reference_acmix.py)
  against the current one.

Each measurement runs in a process of its own, as training does (two models in one process slow
each other down through Paddle's allocator: measured 0.85 s against 1.01 s per step for the same
model), and rounds alternate the variants, so that load on this shared machine hits them alike.
Prints the CPU, medians and ratios; writes build/bench/paddle_acmix.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from export.errors import ExportError
from model.cli import command, one_line_errors, positive_int
from model.data import DataError
from model.files import writable
from runtime.backend import BackendError
from runtime.cpu import cpu_info, describe

TASKS = {"train_step": ("previous", "current"), "inference": ("reference", "current")}
WARMUP_STEPS = 3


def measure(task: str, variant: str, batch: int, steps: int) -> list[float]:
    """Seconds per training step (after WARMUP_STEPS untimed ones) or per inference call (after one) of one variant."""
    from model.runtime import import_paddle

    paddle = import_paddle()
    from model.alexnet import AlexNet_ACmix

    paddle.seed(0)
    rng = np.random.default_rng(0)
    if task == "inference":
        if variant == "reference":
            from model.reference_acmix import AlexNet_ACmix as ReferenceAlexNet_ACmix

            model, steps = ReferenceAlexNet_ACmix(), min(steps, 2)  # ~25x slower: fewer calls
        else:
            model = AlexNet_ACmix()
        model.eval()
        x = paddle.to_tensor(rng.standard_normal((batch, 3, 128, 128)).astype("float32"))
        times = []
        with paddle.no_grad():
            for i in range(steps + 1):
                started = time.perf_counter()
                model(x)
                if i:
                    times.append(time.perf_counter() - started)
        return times

    from model.augmentation import ReferenceAugmentation, TranslateAugmentation
    from model.data import LabeledImages
    from model.train import train_batches, training_logits, training_loss

    if variant == "previous":
        from benchmarks.previous_training import previous_model

        model, augment = previous_model(), ReferenceAugmentation()
    else:
        model, augment = AlexNet_ACmix(), TranslateAugmentation(jpeg=0.5)
    optimizer = paddle.optimizer.Adam(parameters=model.parameters(), weight_decay=1e-5, use_multi_tensor=True)
    count = batch * (steps + WARMUP_STEPS)
    images = LabeledImages(list(rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)),
                           rng.integers(0, 10, count), [str(i) for i in range(count)])
    model.train()
    times, started = [], time.perf_counter()
    batches = train_batches(images, batch, augment, np.random.default_rng(1), steps + WARMUP_STEPS)
    for step, (xb, yb, mix) in enumerate(batches):
        loss = training_loss(training_logits(model, xb), yb, mix, 0.1)
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        float(loss)
        now = time.perf_counter()
        if step >= WARMUP_STEPS:
            times.append(now - started)
        started = now
    return times


def in_child(task: str, variant: str, batch: int, steps: int) -> list[float]:
    command = [sys.executable, "-m", "benchmarks.paddle_acmix", "--child", f"{task}:{variant}", "--batch", str(batch),
               "--steps", str(steps)]
    env = None
    if (task, variant) == ("train_step", "previous"):
        from benchmarks.previous_training import previous_environment

        env = previous_environment()
    done = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


@one_line_errors(BackendError, DataError, ExportError)
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.paddle_acmix", description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=positive_int, default=128)
    parser.add_argument("--rounds", type=positive_int, default=3, help="processes per variant, alternating")
    parser.add_argument("--steps", type=positive_int, default=5, help="timed steps (calls) per process")
    parser.add_argument("--out", default="build/bench/paddle_acmix.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # task:variant, measured in this process
    args = parser.parse_args(argv)
    writable(args.out)  # before the measurement, not after it
    if args.child:
        task, variant = args.child.split(":")
        print(json.dumps(measure(task, variant, args.batch, args.steps)))
        return 0

    print(f"CPU: {describe()}")
    runs = [(task, variant) for _ in range(args.rounds) for task, variants in TASKS.items() for variant in variants]
    times = {(task, variant): [] for task, variants in TASKS.items() for variant in variants}
    for task, variant in tqdm(runs, desc="measuring", unit="process"):
        times[(task, variant)] += in_child(task, variant, args.batch, args.steps)

    result = {"cpu": cpu_info(), "batch": args.batch, "rounds": args.rounds, "steps": args.steps}
    for task, (base, new) in TASKS.items():
        old_s, new_s = (statistics.median(times[(task, n)]) for n in (base, new))
        result[task] = {f"{base}_s": old_s, f"{new}_s": new_s, f"{base}_img_s": args.batch / old_s,
                        f"{new}_img_s": args.batch / new_s, "speedup": old_s / new_s,
                        "samples": {n: len(times[(task, n)]) for n in (base, new)}}
        print(f"{task:<11} batch {args.batch}: {base} {old_s:6.2f} s ({args.batch / old_s:6.1f} img/s)  "
              f"{new} {new_s:6.2f} s ({args.batch / new_s:6.1f} img/s)  speed-up {old_s / new_s:5.2f}x")
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(command(main))
