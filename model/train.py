"""Train AlexNet-ACmix (or the plain AlexNet) on CIFAR-10.

    python -m model.train [--epochs 50] [--out runs/alexnet_acmix] [--resume] [--init-weights W]
                          [--continue-from model/weights]

The reference recipe by default: Adam 1e-3, weight decay 1e-5, cosine decay per step over the
whole run, label smoothing 0.1, batch 128, the reference's augmentation. 5,000 training images
(500 per class, seeded) are held out for validation and never trained on; the list is written to
--split-file and reused. Every epoch writes a checkpoint (last.*), the best weights on validation
(best.pdparams), metrics.json and curves.png into --out. --resume continues from last.*; where no
checkpoint is left (a fresh machine), --continue-from model/weights continues the shipped run
after its best epoch (see `train`). Both take the run's recorded configuration; a flag given
that differs from it is refused.

--init-weights starts a new run (its own schedule) from a run's best.pdparams or shipped weights,
e.g. the fine-tune stage with lighter augmentation (`make finetune`); the run it starts from is
kept in its record as "parent", for the model card and the learning curves.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from tqdm import tqdm

from model.augmentation import TrainAugmentation
from model.data import DataError, LabeledImages, load_split, open_dataset, save_split, stratified_split
from model.runtime import import_paddle

DEFAULT_DATA = "../shared/data/cifar10-train-jpeg.tar.gz"
DEFAULT_SPLIT = "model/weights/val_split.json"


@dataclass
class TrainConfig:
    arch: str = "alexnet_acmix"
    epochs: int = 50
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-5
    label_smoothing: float = 0.1
    seed: int = 42
    max_steps_per_epoch: int | None = None
    # Augmentation strength; the defaults are the reference's (model/augmentation.py).
    crop_scale_min: float = 0.6
    rotation: float = 20.0
    jitter: float = 0.2
    init_weights: str | None = None

    def augmentation(self) -> TrainAugmentation:
        return TrainAugmentation(jitter=self.jitter, crop_scale=(self.crop_scale_min, 1.0), rotation=self.rotation)


def recorded_config(record: dict) -> dict:
    """A run record's configuration; fields added since it was written take their defaults,
    which are what such a run used."""
    return {**asdict(TrainConfig()), **record["config"]}


def smoothed_cross_entropy(logits, labels, smoothing: float):
    """(1 - s) * NLL + s * mean over classes of -log p, as the reference's LabelSmoothingCrossEntropy."""
    import paddle.nn.functional as F

    log_probs = F.log_softmax(logits, axis=-1)
    nll = -log_probs.take_along_axis(labels.unsqueeze(1), axis=1).squeeze(1)
    return ((1.0 - smoothing) * nll + smoothing * (-log_probs.mean(axis=-1))).mean()


def train_batches(data: LabeledImages, batch_size: int, augment, rng: np.random.Generator, limit: int | None):
    """Shuffled, augmented batches (drop_last), prepared one ahead in a thread.

    Pillow releases the GIL, so augmentation overlaps with Paddle's compute.
    """
    order = rng.permutation(len(data))
    steps = len(order) // batch_size
    if limit is not None:
        steps = min(steps, limit)
    seeds = rng.integers(0, 2**63, size=steps)
    ready: queue.Queue = queue.Queue(maxsize=2)

    def produce():
        for step in range(steps):
            batch_rng = np.random.default_rng(seeds[step])
            idx = order[step * batch_size : (step + 1) * batch_size]
            x = np.stack([augment(data.images[i], batch_rng) for i in idx])
            ready.put((x, data.labels[idx]))

    threading.Thread(target=produce, daemon=True).start()
    for _ in range(steps):
        yield ready.get()


def evaluate_split(model, data: LabeledImages, smoothing: float, batch_size: int = 256) -> dict:
    import paddle

    from model.predict import predict_logits

    logits = predict_logits(model, data.images, batch_size, progress="validating")
    loss = smoothed_cross_entropy(paddle.to_tensor(logits), paddle.to_tensor(data.labels), smoothing)
    return {"loss": float(loss), "accuracy": float((logits.argmax(1) == data.labels).mean())}


def _rename_prefixes(state: dict, renames: dict[str, str]) -> dict:
    out = {}
    for key, value in state.items():
        for old in sorted(renames, key=len, reverse=True):
            if key.startswith(old + "_"):
                key = renames[old] + key[len(old) :]
                break
        out[key] = value
    return out


def optimizer_state(model, optimizer) -> dict:
    """The optimizer's state keyed by structured parameter names (features.0.weight_moment1_0).

    Paddle keys it by generated names (conv2d_40.w_0) that depend on how many layers the
    process built before, so a checkpoint would not load into another process's optimizer.
    """
    return _rename_prefixes(optimizer.state_dict(), {p.name: n for n, p in model.named_parameters()})


def load_optimizer_state(model, optimizer, state: dict) -> None:
    optimizer.set_state_dict(_rename_prefixes(state, {n: p.name for n, p in model.named_parameters()}))


def plot_curves(history: list[dict], path: Path, parent: dict | None = None) -> None:
    """Loss and accuracy per epoch; a run started from another's (parent's) best weights is drawn after it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    offset = len(parent["history"]) if parent else 0
    history = (parent["history"] if parent else []) + [{**h, "epoch": h["epoch"] + offset} for h in history]
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], "o-", label="validation")
    ax_loss.set(xlabel="epoch", ylabel="loss (label-smoothed CE)", title="Loss")
    ax_acc.plot(epochs, [h["train_accuracy"] for h in history], "o-", label="train (augmented)")
    ax_acc.plot(epochs, [h["val_accuracy"] for h in history], "o-", label="validation")
    ax_acc.set(xlabel="epoch", ylabel="top-1 accuracy", title="Accuracy")
    for ax in (ax_loss, ax_acc):
        if offset:
            ax.axvline(offset + 0.5, color="gray", linestyle="--", label=f"from the weights of epoch {parent['best']['epoch']}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train(
    config: TrainConfig,
    train_data: LabeledImages,
    val_data: LabeledImages,
    out: Path,
    resume: bool = False,
    augment=None,
    until_epoch: int | None = None,
    continue_from: Path | None = None,
) -> dict:
    """Run (or continue) training; returns the metrics record (also in out/metrics.json).

    until_epoch stops early (after that epoch's checkpoint), to be continued with resume.
    continue_from (a folder that model.ship wrote: SHIPPED_WEIGHTS and SHIPPED_METRICS) continues
    the shipped run after its best epoch when no checkpoint is left: same history, schedule and
    batches; only Adam's moments, which are not shipped, start afresh.
    """
    paddle = import_paddle()
    from model.alexnet import build_model

    out.mkdir(parents=True, exist_ok=True)
    augment = augment or config.augmentation()
    steps_per_epoch = len(train_data) // config.batch_size
    if config.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
    if steps_per_epoch == 0:
        raise DataError(f"{len(train_data)} training images are fewer than one batch of {config.batch_size}")

    paddle.seed(config.seed)
    model = build_model(config.arch)
    scheduler = paddle.optimizer.lr.CosineAnnealingDecay(config.lr, T_max=steps_per_epoch * config.epochs)
    # Multi-tensor Adam: Paddle 3.3's per-parameter CPU Adam kernel leaves the process running
    # every later convolution about twice as slow (measured); the fused one does not.
    optimizer = paddle.optimizer.Adam(
        learning_rate=scheduler,
        parameters=model.parameters(),
        weight_decay=config.weight_decay,
        use_multi_tensor=True,
    )
    record = {"config": asdict(config), "history": [], "best": None}
    if resume and (out / "last.pdparams").exists():
        model.set_state_dict(paddle.load(str(out / "last.pdparams")))
        load_optimizer_state(model, optimizer, paddle.load(str(out / "last.pdopt")))
        record = json.loads((out / "metrics.json").read_text())
        check_same_config(record, config, out)
        check_checkpoint(scheduler, record, steps_per_epoch, out)
        print(f"resuming after epoch {len(record['history'])} from {out}", file=sys.stderr)
    elif continue_from is not None:
        record = continue_shipped(model, scheduler, Path(continue_from), config, steps_per_epoch)
        paddle.save(model.state_dict(), str(out / "best.pdparams"))
        print(f"continuing after epoch {len(record['history'])} from {continue_from} (fresh Adam moments)",
              file=sys.stderr)
    elif config.init_weights:
        model.set_state_dict(paddle.load(config.init_weights))
        record["parent"] = parent_record(Path(config.init_weights))

    last_epoch = min(config.epochs, until_epoch or config.epochs)
    for epoch in range(len(record["history"]) + 1, last_epoch + 1):
        # Per-epoch seeds make a resumed run draw the same batches as an uninterrupted one.
        paddle.seed(config.seed * 1000 + epoch)
        rng = np.random.default_rng([config.seed, epoch])
        model.train()
        seen = correct = 0
        loss_sum = 0.0
        started = time.perf_counter()
        bar = tqdm(
            train_batches(train_data, config.batch_size, augment, rng, config.max_steps_per_epoch),
            total=steps_per_epoch,
            desc=f"epoch {epoch}/{config.epochs}",
            unit="step",
        )
        for x, y in bar:
            x, y = paddle.to_tensor(x), paddle.to_tensor(y)
            logits = model(x)
            loss = smoothed_cross_entropy(logits, y, config.label_smoothing)
            loss.backward()
            optimizer.step()
            optimizer.clear_grad()
            scheduler.step()
            seen += len(y)
            correct += int((logits.argmax(1) == y).sum())
            loss_sum += float(loss) * len(y)
            rate = seen / (time.perf_counter() - started)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", img_s=f"{rate:.0f}")
        bar.close()
        train_seconds = time.perf_counter() - started
        val = evaluate_split(model, val_data, config.label_smoothing)
        entry = {
            "epoch": epoch,
            "lr": float(optimizer.get_lr()),
            "train_loss": loss_sum / seen,
            "train_accuracy": correct / seen,
            "val_loss": val["loss"],
            "val_accuracy": val["accuracy"],
            "train_images_per_s": seen / train_seconds,
            "epoch_seconds": time.perf_counter() - started,
        }
        record["history"].append(entry)
        weights = model.state_dict()
        if record["best"] is None or entry["val_accuracy"] > record["best"]["val_accuracy"]:
            record["best"] = {"epoch": epoch, "val_accuracy": entry["val_accuracy"]}
            with replacing(out / "best.pdparams") as tmp:
                paddle.save(weights, tmp)
        with replacing(out / "last.pdparams") as tmp:
            paddle.save(weights, tmp)
        with replacing(out / "last.pdopt") as tmp:
            paddle.save(optimizer_state(model, optimizer), tmp)
        # Written last: metrics.json says which epoch the checkpoint holds (see check_checkpoint).
        with replacing(out / "metrics.json") as tmp:
            Path(tmp).write_text(json.dumps(record, indent=2) + "\n")
        plot_curves(record["history"], out / "curves.png", record.get("parent"))
        print(
            f"epoch {epoch}: train loss {entry['train_loss']:.4f} acc {entry['train_accuracy']:.4f} | "
            f"val loss {entry['val_loss']:.4f} acc {entry['val_accuracy']:.4f} | "
            f"{entry['train_images_per_s']:.0f} img/s",
            file=sys.stderr,
        )
    return record


@contextmanager
def replacing(path: Path):
    """Yields a path beside `path` to write to, renamed over it once written: a run killed
    mid-save leaves the previous file whole."""
    tmp = path.with_name(path.name + ".tmp")
    yield str(tmp)
    os.replace(tmp, path)


def check_checkpoint(scheduler, record: dict, steps_per_epoch: int, out: Path) -> None:
    """ValueError unless the loaded checkpoint is the epoch metrics.json ends with.

    They differ only when a run was killed between writing the two.
    """
    done = len(record["history"])
    if scheduler.last_epoch != done * steps_per_epoch:
        raise ValueError(
            f"{out}: last.pdopt is at step {scheduler.last_epoch}, metrics.json records {done} epochs "
            f"of {steps_per_epoch} steps (the run was stopped while saving); move last.* away and continue "
            "the shipped run with --continue-from model/weights"
        )


def check_same_config(record: dict, config: TrainConfig, source: Path) -> None:
    """ValueError unless the run recorded in `source` used this configuration."""
    recorded, wanted = recorded_config(record), asdict(config)
    if recorded != wanted:
        differ = ", ".join(f"{k}={v!r}" for k, v in recorded.items() if wanted[k] != v)
        raise ValueError(f"{source} holds a run with another configuration ({differ})")


def parent_record(weights: Path) -> dict | None:
    """The record of the run whose best weights `weights` are (a run's best.pdparams, or shipped
    weights), or None for other weights."""
    beside = {"best.pdparams": "metrics.json", SHIPPED_WEIGHTS: SHIPPED_METRICS}.get(weights.name)
    if beside is None or not (weights.parent / beside).is_file():
        return None
    return json.loads((weights.parent / beside).read_text())


SHIPPED_WEIGHTS = "alexnet_acmix.pdparams"
SHIPPED_METRICS = "training_metrics.json"


def continue_shipped(model, scheduler, folder: Path, config: TrainConfig, steps_per_epoch: int) -> dict:
    """Load shipped weights into `model`, set the schedule after their epoch; returns the record."""
    import paddle

    weights, metrics = folder / SHIPPED_WEIGHTS, folder / SHIPPED_METRICS
    for path in (weights, metrics):
        if not path.is_file():
            raise DataError(f"{path}: missing; {folder} holds no shipped run (python -m model.ship writes one)")
    record = json.loads(metrics.read_text())
    check_same_config(record, config, metrics)
    if len(record["history"]) >= config.epochs:
        raise ValueError(f"{metrics}: its run is complete ({config.epochs} epochs); nothing to continue "
                         "(a new run starts from its weights with --init-weights)")
    epoch = record["best"]["epoch"]  # the shipped weights are the best epoch's
    record["history"] = record["history"][:epoch]
    model.set_state_dict(paddle.load(str(weights)))
    step = epoch * steps_per_epoch
    # Paddle's cosine schedule is recursive in its last value: set both, from the closed form.
    lr = scheduler.eta_min + (scheduler.base_lr - scheduler.eta_min) * (1 + math.cos(math.pi * step / scheduler.T_max)) / 2
    scheduler.set_state_dict({"last_epoch": step, "last_lr": lr})
    return record


def continued_config(out: Path, resume: bool, continue_from: str | None) -> dict:
    """The recorded configuration of the run that --resume or --continue-from continues ({} for none)."""
    if resume and (out / "metrics.json").is_file():
        return recorded_config(json.loads((out / "metrics.json").read_text()))
    if continue_from and (Path(continue_from) / SHIPPED_METRICS).is_file():
        return recorded_config(json.loads((Path(continue_from) / SHIPPED_METRICS).read_text()))
    return {}


def load_train_val(data_path: str, split_file: str, per_class: int, seed: int):
    """The training and held-out validation images; creates the split file on first use."""
    data = open_dataset(data_path, split="train")
    split_path = Path(split_file)
    if split_path.exists():
        held_out = set(load_split(split_path)["val"])
        val_idx = np.array([i for i, s in enumerate(data.sources) if s in held_out])
        if len(val_idx) != len(held_out):
            raise DataError(f"{split_file}: lists {len(held_out)} images, {len(val_idx)} of them are in {data_path}")
        train_idx = np.setdiff1d(np.arange(len(data)), val_idx)
    else:
        train_idx, val_idx = stratified_split(data.labels, per_class, seed)
        save_split(split_path, data, val_idx, seed, origin=Path(data_path).name)
        print(f"wrote the validation split ({len(val_idx)} images) to {split_file}", file=sys.stderr)
    return data.subset(train_idx), data.subset(val_idx)


# Every TrainConfig field but the architecture, which also names the run folder.
RECIPE_FLAGS = tuple(field.name for field in fields(TrainConfig) if field.name != "arch")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.train", description=__doc__.split("\n\n")[0])
    defaults = TrainConfig()
    # Recipe flags default to None: unset, they take the recorded run's value (--resume,
    # --continue-from) or TrainConfig's.
    parser.add_argument("--data", default=DEFAULT_DATA, help="CIFAR-10 training images (either format)")
    parser.add_argument("--arch", default=defaults.arch, choices=["alexnet_acmix", "alexnet"])
    parser.add_argument("--epochs", type=int, help=f"default {defaults.epochs}")
    parser.add_argument("--batch-size", type=int, help=f"default {defaults.batch_size}")
    parser.add_argument("--lr", type=float, help=f"peak learning rate, default {defaults.lr:g}")
    parser.add_argument("--weight-decay", type=float, help=f"default {defaults.weight_decay:g}")
    parser.add_argument("--label-smoothing", type=float, help=f"default {defaults.label_smoothing:g}")
    parser.add_argument("--seed", type=int, help=f"default {defaults.seed}")
    parser.add_argument("--max-steps-per-epoch", type=int, help="for quick trials")
    parser.add_argument("--crop-scale-min", type=float, help=f"random resized crop's smallest area, default {defaults.crop_scale_min:g}")
    parser.add_argument("--rotation", type=float, help=f"largest rotation in degrees, default {defaults.rotation:g}")
    parser.add_argument("--jitter", type=float, help=f"color jitter strength, default {defaults.jitter:g}")
    parser.add_argument("--init-weights", help="start a new run from these weights (a run's best.pdparams or shipped weights)")
    parser.add_argument("--split-file", default=DEFAULT_SPLIT, help="validation split record (created if absent)")
    parser.add_argument("--val-per-class", type=int, default=500)
    parser.add_argument("--out", default=None, help="run folder (default runs/<arch>)")
    parser.add_argument("--resume", action="store_true", help="continue from <out>/last.*")
    parser.add_argument("--continue-from", default=None,
                        help="continue a shipped run (e.g. model/weights) after its best epoch, when no checkpoint is left")
    parser.add_argument("--until-epoch", type=int, default=None, help="stop after this epoch (continue with --resume)")
    args = parser.parse_args(argv)
    out = Path(args.out or f"runs/{args.arch}")

    try:
        config = TrainConfig(**{
            **asdict(defaults),
            **continued_config(out, args.resume, args.continue_from),
            "arch": args.arch,
            **{flag: getattr(args, flag) for flag in RECIPE_FLAGS if getattr(args, flag) is not None},
        })
        if args.init_weights and not Path(args.init_weights).is_file():
            raise DataError(f"{args.init_weights}: no such file")
        train_data, val_data = load_train_val(args.data, args.split_file, args.val_per_class, config.seed)
        record = train(
            config, train_data, val_data, out, resume=args.resume, until_epoch=args.until_epoch,
            continue_from=Path(args.continue_from) if args.continue_from else None,
        )
    except (DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    best = record["best"]
    print(f"best validation accuracy {best['val_accuracy']:.4f} at epoch {best['epoch']}: {out / 'best.pdparams'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
