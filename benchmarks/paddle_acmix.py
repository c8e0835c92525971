"""Paddle CPU: the reference ACmix formulation against model/alexnet.py, in one run.

    python -m benchmarks.paddle_acmix [--batch 128] [--repeats 3]

Inference (eval, no grad) and one training step (forward, backward, Adam) of the whole
AlexNet-ACmix at the same batch, in blocks that alternate the two models (each block: one
untimed call, then timed ones) so load on this shared machine hits both alike. Prints medians
and the speed-up ratios; writes build/bench/paddle_acmix.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from model.runtime import available_cores, import_paddle


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="build/bench/paddle_acmix.json")
    args = parser.parse_args(argv)

    paddle = import_paddle()
    from model.alexnet import AlexNet_ACmix
    from model.train import smoothed_cross_entropy
    from tests.model.reference_acmix import AlexNet_ACmix as ReferenceAlexNet_ACmix

    paddle.seed(0)
    models = {"reference": ReferenceAlexNet_ACmix(), "fast": AlexNet_ACmix()}
    models["fast"].set_state_dict(models["reference"].state_dict())
    rng = np.random.default_rng(0)
    x = paddle.to_tensor(rng.standard_normal((args.batch, 3, 128, 128)).astype("float32"))
    y = paddle.to_tensor(rng.integers(0, 10, args.batch))
    optimizers = {
        name: paddle.optimizer.Adam(parameters=m.parameters(), weight_decay=1e-5, use_multi_tensor=True)
        for name, m in models.items()
    }

    def infer(name):
        model = models[name]
        model.eval()
        with paddle.no_grad():
            model(x)

    def train_step(name):
        model, optimizer = models[name], optimizers[name]
        model.train()
        smoothed_cross_entropy(model(x), y, 0.1).backward()
        optimizer.step()
        optimizer.clear_grad()

    # Blocks: one model, one task, an untimed call first (a call right after the other model pays
    # for the memory that one released), then timed calls; the reference is ~10x slower, so fewer.
    timed_calls = {"reference": 1, "fast": 3}
    times = {(task, name): [] for task in ("inference", "train_step") for name in models}
    blocks = [(task, name) for _ in range(args.repeats) for task in ("inference", "train_step") for name in models]
    with tqdm(total=sum(1 + timed_calls[name] for _, name in blocks), desc="measuring", unit="run") as bar:
        for task, name in blocks:
            run = infer if task == "inference" else train_step
            run(name)
            bar.update()
            for _ in range(timed_calls[name]):
                started = time.perf_counter()
                run(name)
                times[(task, name)].append(time.perf_counter() - started)
                bar.update()

    result = {"batch": args.batch, "repeats": args.repeats, "threads": available_cores()}
    for task in ("inference", "train_step"):
        ref, fast = (statistics.median(times[(task, n)]) for n in ("reference", "fast"))
        result[task] = {
            "reference_s": ref,
            "fast_s": fast,
            "reference_img_s": args.batch / ref,
            "fast_img_s": args.batch / fast,
            "speedup": ref / fast,
        }
        print(
            f"{task:<11} batch {args.batch}: reference {ref:6.2f} s ({args.batch / ref:6.1f} img/s)  "
            f"fast {fast:6.2f} s ({args.batch / fast:6.1f} img/s)  speed-up {ref / fast:5.1f}x"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
