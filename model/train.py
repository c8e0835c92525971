"""Train AlexNet-ACmix (or the plain AlexNet) on CIFAR-10.

    python -m model.train [--epochs 50] [--out runs/alexnet_acmix] [--resume] [--init-weights W]
                          [--continue-from model/weights] [--device auto|cpu|gpu] [recipe flags]

The recipe is TrainConfig's fields, each a flag; their defaults are the reference notebook's
(Adam 1e-3, weight decay 1e-5, cosine decay per step over the whole run, label smoothing 0.1,
batch 128, its augmentation), so that old records read as what they ran. The lossless PNG
images are the default data. 5,000 training images (500 per class, seeded) are held out for
validation and never trained on; the list is written to --split-file and reused, whatever the
format the images are read in. Every epoch writes a checkpoint (last.*), the best weights on
validation (best.pdparams), metrics.json and curves.png into --out; parameters whose values are
subnormal floats are set to zero first (model/subnormals.py). --resume continues from last.*;
where no checkpoint is left (a fresh machine), --continue-from model/weights continues the
shipped run after its best epoch. Both take the run's recorded configuration; a flag given that
differs from it is refused.

--init-weights starts a new run (its own schedule) from a run's best.pdparams or shipped weights;
the run it starts from is kept in its record as "parent", for the model card and the curves.
"""

from __future__ import annotations

import argparse
import json
import math
import queue
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from tqdm import tqdm

from model import paths
from model.augmentation import AUGMENTATIONS, Mix, ReferenceAugmentation, TranslateAugmentation, cutmix_batch
from model.cli import command, fail, positive_int
from model.data import DataError, LabeledImages, open_dataset, split_indices
from model.files import missing, replacing, sha256_file
from model.predict import read_state
from model.preprocessing import to_normalized_chw
from model.runtime import DEVICES, import_paddle, resolve_device
from model.source_stem import SOURCE_SIZE, SourceBatch, forward_from_source, source_batch
from model.subnormals import flush_subnormals

OPTIMIZERS = ("adam", "adamw", "sgd")
# What each number of a recipe may be, and that range in words.
RANGES = {
    "epochs": (lambda v: v >= 1, "at least 1"),
    "batch_size": (lambda v: v >= 1, "at least 1"),
    "lr": (lambda v: v > 0, "above 0"),
    "momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "weight_decay": (lambda v: v >= 0, "at least 0"),
    "warmup_epochs": (lambda v: v >= 0, "at least 0"),
    "label_smoothing": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "clip_grad_norm": (lambda v: v >= 0, "at least 0 (0: off)"),
    "max_steps_per_epoch": (lambda v: v is None or v >= 1, "at least 1"),
    "train_per_class": (lambda v: v is None or v >= 1, "at least 1"),
    "crop_scale_min": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "rotation": (lambda v: v >= 0, "at least 0"),
    "jitter": (lambda v: v >= 0, "at least 0"),
    "pad": (lambda v: v >= 0, "at least 0"),
    "erasing": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "jpeg": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "cutmix": (lambda v: 0 <= v <= 1, "in [0, 1]"),
}


@dataclass
class TrainConfig:
    arch: str = "alexnet_acmix"
    epochs: int = 50
    batch_size: int = 128
    # Optimizer: adam (L2 weight decay, the reference's), adamw (decoupled weight decay, not on
    # biases and scalars), sgd (Nesterov momentum, L2 weight decay).
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 1e-5
    # Linear warmup from 0 over this many epochs, then cosine decay to 0 over the rest.
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.1
    # The classifier's dropout probability (no parameters depend on it; the reference's 0.5).
    dropout: float = 0.5
    # Clip the gradient's global norm to this (0: off). The network's initial logits are large
    # (std ~11 on real images: each ACmix layer doubles the scale), so SGD needs it.
    clip_grad_norm: float = 0.0
    seed: int = 42
    max_steps_per_epoch: int | None = None
    # Train on this many images per class of the training split (seeded; None: all of them): proxy
    # runs that reach, in a fraction of the time, the many passes over the data where regularization matters.
    train_per_class: int | None = None
    # Augmentation (model/augmentation.py): "reference" uses crop_scale_min, rotation and
    # jitter; "translate" uses pad and erasing; both re-encode as JPEG with probability jpeg.
    augment: str = "reference"
    crop_scale_min: float = 0.6
    rotation: float = 20.0
    jitter: float = 0.2
    pad: int = 4
    erasing: float = 0.0
    jpeg: float = 0.0
    # Probability that a batch is CutMixed (model/augmentation.py, cutmix_batch), after either augmentation.
    cutmix: float = 0.0
    init_weights: str | None = None
    # Exponential moving average of the weights, updated after every step with this decay (0: off).
    # The average is what the run validates, keeps as its best weights and ships.
    ema: float = 0.0

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"unknown augmentation {self.augment!r}; choose from {', '.join(AUGMENTATIONS)}")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"ema decay {self.ema} is not in [0, 1)")
        for name, (valid, text) in RANGES.items():
            value = getattr(self, name)
            # inf passes "at least 0" and nan fails every comparison quietly: neither is a recipe's number
            if (isinstance(value, float) and not math.isfinite(value)) or not valid(value):
                raise ValueError(f"{name} {value} is out of range (--{name.replace('_', '-')}: {text})")

    def augmentation(self):
        if self.augment == "translate":
            return TranslateAugmentation(pad=self.pad, erasing=self.erasing, jpeg=self.jpeg)
        return ReferenceAugmentation(jitter=self.jitter, crop_scale=(self.crop_scale_min, 1.0),
                                     rotation=self.rotation, jpeg=self.jpeg)


def read_checkpoint(path: Path) -> dict:
    """A Paddle state file of a run's checkpoint; DataError naming it where it is missing or not one."""
    import paddle

    if not path.is_file():
        raise DataError(f"{path}: missing from the run's checkpoint")
    try:
        return paddle.load(str(path))
    except Exception as exc:  # paddle.load raises many types for a bad file
        raise DataError(f"{path}: not a Paddle checkpoint ({type(exc).__name__})") from None


def read_run_record(path: Path) -> dict:
    """A run's record (metrics.json, or the shipped training_metrics.json); DataError naming the
    file where it is not one."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a run record ({exc})") from None
    if not isinstance(record, dict) or not all(key in record for key in ("config", "history", "best")):
        raise DataError(f"{path}: not a run record (no config, history and best)")
    return record


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


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """The learning rate after `step` steps, as a fraction of the peak: linear warmup, then cosine to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return (1 + math.cos(math.pi * min(progress, 1.0))) / 2


def build_optimizer(config: TrainConfig, model, steps_per_epoch: int):
    """(optimizer, scheduler) of the configuration; the scheduler steps once per batch."""
    import paddle

    total = steps_per_epoch * config.epochs
    warmup = round(config.warmup_epochs * steps_per_epoch)
    scheduler = paddle.optimizer.lr.LambdaDecay(config.lr, lambda step: lr_factor(step, total, warmup))
    params = model.parameters()
    clip = {"grad_clip": paddle.nn.ClipGradByGlobalNorm(config.clip_grad_norm)} if config.clip_grad_norm else {}
    if config.optimizer == "adamw":
        decayed = {p.name for p in params if len(p.shape) > 1}  # not biases, not ACmix's rates
        optimizer = paddle.optimizer.AdamW(learning_rate=scheduler, parameters=params,
                                           weight_decay=config.weight_decay, apply_decay_param_fun=decayed.__contains__, **clip)
    elif config.optimizer == "sgd":
        optimizer = paddle.optimizer.Momentum(learning_rate=scheduler, momentum=config.momentum, parameters=params,
                                              use_nesterov=True, weight_decay=config.weight_decay, use_multi_tensor=True,
                                              **clip)
    else:
        # Multi-tensor Adam: Paddle 3.3's per-parameter CPU Adam kernel left the process running
        # every later convolution about twice as slow (measured on AMD EPYC); the fused one does not.
        optimizer = paddle.optimizer.Adam(learning_rate=scheduler, parameters=params,
                                          weight_decay=config.weight_decay, use_multi_tensor=True, **clip)
    return optimizer, scheduler


class WeightAverage:
    """An exponential moving average of a model's parameters: after each optimizer step,
    average = decay * average + (1 - decay) * weights. It starts from the model's weights when
    it is made (those a run starts from), and holds no gradient."""

    def __init__(self, model, decay: float):
        self.decay = decay
        self.parameters = dict(model.named_parameters())
        self.average = {name: p.detach().clone() for name, p in self.parameters.items()}

    def update(self) -> None:
        import paddle

        with paddle.no_grad():
            for name, param in self.parameters.items():
                average = self.average[name]
                average.scale_(self.decay)
                average.add_(param.detach() * (1.0 - self.decay))

    def state_dict(self) -> dict:
        """The averaged parameters, keyed as the model's state dict (loads into a model as weights)."""
        return dict(self.average)

    def set_state_dict(self, state: dict) -> None:
        import paddle

        missing = sorted(set(self.average) - set(state))
        if missing:
            raise ValueError(f"the weight average lacks {missing[0]} and {len(missing) - 1} more")
        self.average = {name: paddle.to_tensor(state[name]) for name in self.average}


def train_batches(data: LabeledImages, batch_size: int, augment, rng: np.random.Generator, limit: int | None,
                  cutmix: float = 0.0):
    """Shuffled, augmented batches (drop_last) as (images, labels, Mix or None), prepared one ahead
    in a thread.

    Pillow and NumPy release the GIL, so augmentation overlaps with Paddle's compute.
    """
    order = rng.permutation(len(data))
    steps = len(order) // batch_size
    if limit is not None:
        steps = min(steps, limit)
    seeds = rng.integers(0, 2**63, size=steps)
    ready: queue.Queue = queue.Queue(maxsize=2)

    def produce():
        try:
            for step in range(steps):
                batch_rng = np.random.default_rng(seeds[step])
                idx = order[step * batch_size : (step + 1) * batch_size]
                batch, mix = augment_batch(augment, [data.images[i] for i in idx], batch_rng, cutmix)
                ready.put((batch, data.labels[idx], mix))
        except Exception as error:  # raised where the batches are read, which would otherwise wait forever
            ready.put(error)

    threading.Thread(target=produce, daemon=True).start()
    for _ in range(steps):
        batch = ready.get()
        if isinstance(batch, Exception):
            raise batch
        yield batch


def augment_batch(augment, images: list[np.ndarray], rng: np.random.Generator,
                  cutmix: float = 0.0) -> tuple[object, Mix | None]:
    """One augmented batch as training_logits reads it, and how it was CutMixed (with probability
    `cutmix`; None if not). Where the augmentation ends in the resize to 128 (TranslateAugmentation)
    and the images are 32x32, a SourceBatch for the fast first layer (model/source_stem.py), mixed
    at 32x32; else float32 [N, 3, 128, 128]."""
    fast = isinstance(augment, TranslateAugmentation) and all(i.shape[:2] == (SOURCE_SIZE,) * 2 for i in images)
    batch = np.stack([to_normalized_chw(augment.source(image, rng)) if fast else augment(image, rng)
                      for image in images])
    mix = None
    if cutmix and rng.random() < cutmix:  # no draw when off: batches stay those of runs before CutMix
        batch, mix = cutmix_batch(batch, rng)
    return (source_batch(batch) if fast else batch), mix


def training_logits(model, batch):
    """The model's logits for a batch of augment_batch."""
    import paddle

    if isinstance(batch, SourceBatch):
        return forward_from_source(model, batch)
    return model(paddle.to_tensor(batch))


def training_loss(logits, labels: np.ndarray, mix: Mix | None, smoothing: float):
    """The smoothed cross-entropy of a batch; of a CutMixed one, lam of it against the images' own
    labels and 1 - lam against their partners'."""
    import paddle

    loss = smoothed_cross_entropy(logits, paddle.to_tensor(labels), smoothing)
    if mix is None:
        return loss
    partner = smoothed_cross_entropy(logits, paddle.to_tensor(labels[mix.partner]), smoothing)
    return mix.lam * loss + (1.0 - mix.lam) * partner


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


def flush_subnormal_parameters(model) -> int:
    """Set the model's subnormal parameter values to 0, in place; returns how many there were."""
    flushed = 0
    for param in model.parameters():
        values = param.numpy()
        clean = flush_subnormals(values)
        if clean is not values:
            flushed += int((clean != values).sum())
            param.set_value(clean)
    return flushed


def flush_subnormal_state(state: dict) -> dict:
    """An optimizer state dict with subnormal values in its tensors set to 0 (moments of dead units)."""
    import paddle

    out = {}
    for key, value in state.items():
        if isinstance(value, paddle.Tensor) and value.dtype in (paddle.float32, paddle.float64):
            values = value.numpy()
            clean = flush_subnormals(values)
            value = value if clean is values else paddle.to_tensor(clean)
        out[key] = value
    return out


def lineage(record: dict) -> list[dict]:
    """The run records that `record` descends from, oldest first and ending with `record`: each run
    started from the best weights of the one before it (its "parent")."""
    chain = []
    while record is not None:
        chain.append(record)
        record = record.get("parent")
    return chain[::-1]


def plot_curves(history: list[dict], path: Path, parent: dict | None = None) -> None:
    """Loss and accuracy per epoch; the runs this one descends from (parent's lineage) are drawn before it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    combined, starts, offset = [], [], 0
    for stage in lineage(parent) if parent else []:
        combined += [{**h, "epoch": h["epoch"] + offset} for h in stage["history"]]
        offset += len(stage["history"])
        starts.append(offset)
    history = combined + [{**h, "epoch": h["epoch"] + offset} for h in history]
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], "o-", label="validation")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="Loss (label-smoothed in runs that smoothed)")
    ax_acc.plot(epochs, [h["train_accuracy"] for h in history], "o-", label="train (augmented)")
    ax_acc.plot(epochs, [h["val_accuracy"] for h in history], "o-", label="validation")
    ax_acc.set(xlabel="epoch", ylabel="top-1 accuracy", title="Accuracy")
    for ax in (ax_loss, ax_acc):
        for i, end in enumerate(starts):
            ax.axvline(end + 0.5, color="gray", linestyle="--",
                       label="a new run from the previous one's best epoch" if i == 0 else None)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@dataclass
class Session:
    """What one training process holds: the model, its optimizer and schedule, and the record."""

    config: TrainConfig
    model: object
    optimizer: object
    scheduler: object
    steps_per_epoch: int
    record: dict
    average: WeightAverage | None = None


def train(
    config: TrainConfig,
    train_data: LabeledImages,
    val_data: LabeledImages,
    out: Path,
    resume: bool = False,
    augment=None,
    until_epoch: int | None = None,
    continue_from: Path | None = None,
    device: str = "cpu",
    device_reason: str = "",
) -> dict:
    """Run (or continue) training; returns the metrics record (also in out/metrics.json).

    until_epoch stops early (after that epoch's checkpoint), to be continued with resume.
    continue_from (a folder that model.ship wrote: SHIPPED_WEIGHTS and SHIPPED_METRICS) continues
    the shipped run after its best epoch when no checkpoint is left: same history, schedule and
    batches; only the optimizer's moments, which are not shipped, start afresh (and, in a run that keeps
    a weight average, the trained weights start from the average, which is what was shipped).
    """
    import_paddle(device=device)
    out.mkdir(parents=True, exist_ok=True)
    session = start_session(config, len(train_data), out, resume, continue_from)
    session.record.setdefault("data", train_data.origin)
    session.record["device"] = device
    session.record["train_images"] = len(train_data)
    print(f"training on the {device.upper()}{f' ({device_reason})' if device_reason else ''}", file=sys.stderr)
    augment = augment or config.augmentation()
    last_epoch = min(config.epochs, until_epoch or config.epochs)
    for epoch in range(len(session.record["history"]) + 1, last_epoch + 1):
        started = time.perf_counter()
        entry = train_epoch(session, train_data, augment, epoch)
        if session.average is not None:
            raw = evaluate_split(session.model, val_data, config.label_smoothing)
            entry.update(raw_val_loss=raw["loss"], raw_val_accuracy=raw["accuracy"])
        with kept_weights(session) as kept:
            val = evaluate_split(kept, val_data, config.label_smoothing)
        entry.update(val_loss=val["loss"], val_accuracy=val["accuracy"], epoch_seconds=time.perf_counter() - started)
        save_epoch(session, entry, out)
        print(
            f"epoch {epoch}: train loss {entry['train_loss']:.4f} acc {entry['train_accuracy']:.4f} | "
            f"val loss {entry['val_loss']:.4f} acc {entry['val_accuracy']:.4f}"
            + (f" (raw weights {entry['raw_val_accuracy']:.4f})" if "raw_val_accuracy" in entry else "") + " | "
            f"{entry['train_images_per_s']:.0f} img/s",
            file=sys.stderr,
        )
    return session.record


def start_session(config: TrainConfig, train_size: int, out: Path, resume: bool, continue_from: Path | None) -> Session:
    """The model and optimizer of a new run, of a resumed checkpoint, or of a continued shipped run."""
    import paddle

    from model.alexnet import build_model

    steps_per_epoch = train_size // config.batch_size
    if config.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
    if steps_per_epoch == 0:
        raise DataError(f"{train_size} training images are fewer than one batch of {config.batch_size}")
    paddle.seed(config.seed)
    model = build_model(config.arch, dropout=config.dropout)
    optimizer, scheduler = build_optimizer(config, model, steps_per_epoch)
    session = Session(config, model, optimizer, scheduler, steps_per_epoch,
                      {"config": asdict(config), "history": [], "best": None})
    if resume:
        session.record = read_run_record(out / "metrics.json")
        model.set_state_dict(read_state(model, out / "last.pdparams", config.arch))
        load_optimizer_state(model, optimizer, read_checkpoint(out / "last.pdopt"))
        if config.ema:
            session.average = WeightAverage(model, config.ema)
            session.average.set_state_dict(read_checkpoint(out / "last.pdema"))
        check_same_config(session.record, config, out)
        check_checkpoint(scheduler, session.record, steps_per_epoch, out)
        print(f"resuming after epoch {len(session.record['history'])} from {out}", file=sys.stderr)
    elif continue_from is not None:
        session.record = continue_shipped(model, scheduler, Path(continue_from), config, steps_per_epoch)
        paddle.save(model.state_dict(), str(out / "best.pdparams"))
        print(f"continuing after epoch {len(session.record['history'])} from {continue_from} "
              "(fresh optimizer moments)", file=sys.stderr)
    elif config.init_weights:
        model.set_state_dict(read_state(model, config.init_weights, config.arch))
        session.record["parent"] = parent_record(Path(config.init_weights))
        session.record["init_weights_sha256"] = sha256_file(config.init_weights)  # what model.average checks
    if config.ema and session.average is None:
        session.average = WeightAverage(model, config.ema)
    return session


@contextmanager
def kept_weights(session: Session):
    """The model holding the weights the run validates and keeps (the weight average's, where there
    is one, swapped in for the block: a second model in the process would slow training down)."""
    if session.average is None:
        yield session.model
        return
    model = session.model
    trained = {name: p.detach().clone() for name, p in model.named_parameters()}
    model.set_state_dict(session.average.state_dict())
    try:
        yield model
    finally:
        model.set_state_dict(trained)


def train_epoch(session: Session, train_data: LabeledImages, augment, epoch: int) -> dict:
    """One pass over the training batches; the epoch's training figures."""
    import paddle

    config, model, optimizer = session.config, session.model, session.optimizer
    # Per-epoch seeds make a resumed run draw the same batches as an uninterrupted one.
    paddle.seed(config.seed * 1000 + epoch)
    rng = np.random.default_rng([config.seed, epoch])
    model.train()
    seen = correct = 0
    loss_sum = 0.0
    started = time.perf_counter()
    batches = train_batches(train_data, config.batch_size, augment, rng, config.max_steps_per_epoch, config.cutmix)
    bar = tqdm(batches, total=session.steps_per_epoch, desc=f"epoch {epoch}/{config.epochs}", unit="step")
    for x, labels, mix in bar:
        logits = training_logits(model, x)
        loss = training_loss(logits, labels, mix, config.label_smoothing)
        y = paddle.to_tensor(labels)  # training accuracy counts a CutMixed image's own label
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        session.scheduler.step()
        if session.average is not None:
            session.average.update()
        seen += len(y)
        correct += int((logits.argmax(1) == y).sum())
        loss_sum += float(loss) * len(y)
        rate = seen / (time.perf_counter() - started)
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", img_s=f"{rate:.0f}")
    bar.close()
    return {
        "epoch": epoch,
        "lr": float(optimizer.get_lr()),
        "train_loss": loss_sum / seen,
        "train_accuracy": correct / seen,
        "train_images_per_s": seen / (time.perf_counter() - started),
    }


def save_epoch(session: Session, entry: dict, out: Path) -> None:
    """Record the epoch and write its checkpoint, the best weights if they are, the record and the curves."""
    import paddle

    record, model = session.record, session.model
    record["history"].append(entry)
    flush_subnormal_parameters(model)
    weights = model.state_dict()
    kept = weights if session.average is None else flush_subnormal_state(session.average.state_dict())
    if record["best"] is None or entry["val_accuracy"] > record["best"]["val_accuracy"]:
        record["best"] = {"epoch": entry["epoch"], "val_accuracy": entry["val_accuracy"]}
        with replacing(out / "best.pdparams") as tmp:
            paddle.save(kept, tmp)
    with replacing(out / "last.pdparams") as tmp:
        paddle.save(weights, tmp)
    if session.average is not None:
        with replacing(out / "last.pdema") as tmp:
            paddle.save(kept, tmp)
    with replacing(out / "last.pdopt") as tmp:
        paddle.save(flush_subnormal_state(optimizer_state(model, session.optimizer)), tmp)
    # Written last: metrics.json says which epoch the checkpoint holds (see check_checkpoint).
    with replacing(out / "metrics.json") as tmp:
        Path(tmp).write_text(json.dumps(record, indent=2) + "\n")
    plot_curves(record["history"], out / "curves.png", record.get("parent"))


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


SHIPPED_WEIGHTS = Path(paths.WEIGHTS).name
SHIPPED_METRICS = paths.TRAINING_METRICS


def parent_record(weights: Path) -> dict | None:
    """The record of the run whose best weights `weights` are (a run's best.pdparams, or shipped
    weights), or None for other weights."""
    beside = {"best.pdparams": "metrics.json", SHIPPED_WEIGHTS: SHIPPED_METRICS}.get(weights.name)
    if beside is None or not (weights.parent / beside).is_file():
        return None
    return read_run_record(weights.parent / beside)


def continue_shipped(model, scheduler, folder: Path, config: TrainConfig, steps_per_epoch: int) -> dict:
    """Load shipped weights into `model`, set the schedule after their epoch; returns the record."""

    weights, metrics = folder / SHIPPED_WEIGHTS, folder / SHIPPED_METRICS
    for path in (weights, metrics):
        if not path.is_file():
            raise DataError(f"{path}: missing; {folder} holds no shipped run (python -m model.ship writes one)")
    record = read_run_record(metrics)
    check_same_config(record, config, metrics)
    if len(record["history"]) >= config.epochs:
        raise ValueError(f"{metrics}: its run is complete ({config.epochs} epochs); nothing to continue "
                         "(a new run starts from its weights with --init-weights)")
    epoch = record["best"]["epoch"]  # the shipped weights are the best epoch's
    record["history"] = record["history"][:epoch]
    model.set_state_dict(read_state(model, weights, config.arch))
    step = epoch * steps_per_epoch
    scheduler.set_state_dict({"last_epoch": step, "last_lr": scheduler.base_lr * scheduler.lr_lambda(step)})
    return record


def continued_config(out: Path, resume: bool, continue_from: str | None) -> dict:
    """The recorded configuration of the run that --resume or --continue-from continues ({} for none)."""
    if resume:
        if not (out / "last.pdparams").is_file():
            raise DataError(f"{out}: no checkpoint (last.pdparams) to resume; without --resume a new run starts there")
        return recorded_config(read_run_record(out / "metrics.json"))
    if continue_from and (Path(continue_from) / SHIPPED_METRICS).is_file():
        return recorded_config(read_run_record(Path(continue_from) / SHIPPED_METRICS))
    return {}


def load_train_val(data_path: str, split_file: str, per_class: int, seed: int, train_per_class: int | None = None):
    """The training and held-out validation images; creates the split file on first use. With
    train_per_class, that many training images of each class (seeded), the validation split unchanged."""
    data = open_dataset(data_path, split="train")
    train_idx, val_idx = split_indices(data, split_file, per_class, seed)
    if train_per_class is not None:
        train_idx = per_class_subset(data.labels, np.asarray(train_idx), train_per_class, seed)
    return data.subset(train_idx), data.subset(val_idx)


def per_class_subset(labels: np.ndarray, indices: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """`per_class` of `indices` for each class, drawn with `seed`, in their original order; DataError
    where a class has fewer."""
    shuffled = indices[np.random.default_rng([seed, per_class]).permutation(len(indices))]
    kept = []
    for label in np.unique(labels[indices]):
        of_class = shuffled[labels[shuffled] == label]
        if len(of_class) < per_class:
            raise DataError(f"--train-per-class {per_class}: class {label} has {len(of_class)} training images")
        kept.append(of_class[:per_class])
    return np.sort(np.concatenate(kept))


# Every TrainConfig field but the architecture, which also names the run folder.
RECIPE_FLAGS = tuple(field.name for field in fields(TrainConfig) if field.name != "arch")
RECIPE_HELP = {
    "optimizer": f"one of {', '.join(OPTIMIZERS)}",
    "lr": "peak learning rate",
    "momentum": "sgd's Nesterov momentum",
    "warmup_epochs": "linear warmup before the cosine decay",
    "max_steps_per_epoch": "for quick trials",
    "train_per_class": "train on this many images per class (seeded) for proxy runs; default all",
    "dropout": "the classifier's dropout probability",
    "clip_grad_norm": "clip the gradient's global norm (0: off)",
    "augment": f"one of {', '.join(AUGMENTATIONS)}",
    "crop_scale_min": "reference augmentation: random resized crop's smallest area",
    "rotation": "reference augmentation: largest rotation in degrees",
    "jitter": "reference augmentation: color jitter strength",
    "pad": "translate augmentation: largest shift in source pixels",
    "erasing": "translate augmentation: probability of erasing a random rectangle",
    "jpeg": "probability of re-encoding a training image as JPEG (random quality 40-95)",
    "cutmix": "probability of CutMixing a batch (one box pasted from the batch in another order)",
    "init_weights": "start a new run from these weights (a run's best.pdparams or shipped weights)",
    "ema": "decay of an exponential moving average of the weights per step, which the run validates and keeps (0: off)",
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.train", description=__doc__.split("\n\n")[0])
    defaults = TrainConfig()
    parser.add_argument("--data", default=paths.DATA, help="CIFAR-10 training images (either format; default lossless)")
    parser.add_argument("--arch", default=defaults.arch, choices=["alexnet_acmix", "alexnet"])
    # Recipe flags default to None: unset, they take the recorded run's value (--resume,
    # --continue-from) or TrainConfig's.
    for field in fields(TrainConfig):
        if field.name == "arch":
            continue
        default = getattr(defaults, field.name)
        # The field's annotation ("int | None", "float", ...; strings under `from __future__ import annotations`).
        kind = {"int": int, "float": float}.get(field.type.split(" | ")[0], str)
        shown = None if default is None else f"default {default:g}" if isinstance(default, float) else f"default {default}"
        help_text = "; ".join(part for part in (RECIPE_HELP.get(field.name), shown) if part)
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=kind, help=help_text)
    parser.add_argument("--split-file", default=paths.SPLIT_FILE, help="validation split record (created if absent)")
    parser.add_argument("--val-per-class", type=positive_int, default=500)
    parser.add_argument("--out", default=None, help="run folder (default runs/<arch>)")
    parser.add_argument("--device", default="auto", choices=DEVICES,
                        help="auto: a CUDA GPU where Paddle is a CUDA build and one is visible, else the CPU")
    parser.add_argument("--resume", action="store_true", help="continue from <out>/last.*")
    parser.add_argument("--continue-from", default=None,
                        help="continue a shipped run (e.g. model/weights) after its best epoch, when no checkpoint is left")
    parser.add_argument("--until-epoch", type=positive_int, default=None,
                        help="stop after this epoch (continue with --resume)")
    args = parser.parse_args(argv)
    out = Path(args.out or f"runs/{args.arch}")

    try:
        config = TrainConfig(**{
            **asdict(defaults),
            **continued_config(out, args.resume, args.continue_from),
            "arch": args.arch,
            **{flag: getattr(args, flag) for flag in RECIPE_FLAGS if getattr(args, flag) is not None},
        })
        if args.init_weights and (why := missing(args.init_weights, "weights file")):
            raise DataError(why)
        if out.exists() and not out.is_dir():
            raise DataError(f"{out}: a file, not a folder for the run (--out)")
        device, reason = resolve_device(args.device)
        train_data, val_data = load_train_val(args.data, args.split_file, args.val_per_class, config.seed,
                                              config.train_per_class)
        record = train(
            config, train_data, val_data, out, resume=args.resume, until_epoch=args.until_epoch,
            continue_from=Path(args.continue_from) if args.continue_from else None, device=device,
            device_reason=reason,
        )
    except (DataError, ValueError, OSError) as exc:
        return fail(exc)
    best = record["best"]
    print(f"best validation accuracy {best['val_accuracy']:.4f} at epoch {best['epoch']}: {out / 'best.pdparams'}")
    return 0


if __name__ == "__main__":
    sys.exit(command(main))
