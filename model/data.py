"""CIFAR-10 readers, the held-out validation split, and batching.

Two on-disk formats, read in place (archives are never unpacked to disk):
  * the official python tarball `cifar-10-python.tar.gz` (`cifar-10-batches-py/data_batch_*`,
    `test_batch`), the reference notebook's format;
  * images in one folder per class named after the CIFAR-10 classes, as a folder or a
    `.tar`/`.tar.gz` (e.g. `train/airplane/0000.jpg`), the format of ../shared/data.
"""

from __future__ import annotations

import json
import pickle
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.preprocessing import SUFFIXES, ImageError, decode_image
from model.spec import CLASSES

PYTHON_TARBALL_DIR = "cifar-10-batches-py"
SPLITS = ("all", "train", "test", "val")


class DataError(Exception):
    """A data set that cannot be read; the message names the file and the cause."""


@dataclass
class LabeledImages:
    """Decoded images (uint8 HxWx3 each) with their labels and where each came from."""

    images: list[np.ndarray]
    labels: np.ndarray
    sources: list[str]
    format: str = "folder"  # or "python" (the official tarball, which has train and test splits)
    origin: str = ""  # the file or folder name they were read from


    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices) -> LabeledImages:
        indices = np.asarray(indices, dtype=np.int64)
        return LabeledImages(
            [self.images[i] for i in indices],
            self.labels[indices],
            [self.sources[i] for i in indices],
            self.format,
            self.origin,
        )


def open_dataset(path: str | Path, split: str = "all", val_split: str | Path | None = None) -> LabeledImages:
    """Read a data set in either format.

    split: "all"; "train" or "test" pick the python tarball's batches (a folder data set has only
    "all"); "val" keeps the images listed in the validation-split file, "train" also drops them.
    """
    path = Path(path)
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_dir():
        data = _read_class_folders_dir(path)
    elif tarfile.is_tarfile(path):
        data = _read_tar(path, split)
    else:
        raise DataError(f"{path}: not a folder, a .tar/.tar.gz of class folders, or cifar-10-python.tar.gz")
    data.origin = path.name
    if data.format == "folder" and split == "test":
        raise DataError(f"{path}: a data set of class folders has no test split (cifar-10-python.tar.gz has one); "
                        "pass the test images themselves")
    if split in ("val", "train") and val_split is not None:
        held_out = held_out_mask(data, load_split(val_split))
        if split == "val" and not held_out.any():
            raise DataError(f"{path}: none of the images listed in {val_split} are in this data set")
        data = data.subset(np.flatnonzero(held_out == (split == "val")))
    return data


def image_key(source: str) -> str:
    """An image's name without its suffix: train/cat/0042.png and train/cat/0042.jpg are one image
    in two formats, so a split written from either archive selects the same images in both."""
    stem, dot, suffix = source.rpartition(".")
    return stem if dot and "/" not in suffix else source


def held_out_mask(data: LabeledImages, split_record: dict) -> np.ndarray:
    """True for the images of `data` that the validation-split record lists."""
    listed = {image_key(source) for source in split_record["val"]}
    return np.array([image_key(source) in listed for source in data.sources], dtype=bool)


def held_out_subset(data: LabeledImages, split_file: str | Path) -> LabeledImages | None:
    """The held-out images of `data` where it holds every image the split file lists: the training
    images the split was drawn from, in either format and wherever they lie; else None."""
    if not Path(split_file).is_file():
        return None
    record = load_split(split_file)
    held_out = held_out_mask(data, record)
    return data.subset(np.flatnonzero(held_out)) if record["val"] and held_out.sum() == len(record["val"]) else None


def split_indices(data: LabeledImages, split_file: str | Path, per_class: int, seed: int):
    """(train indices, validation indices) of `data` by its split file, written on first use
    (`per_class` images of each class, seeded); DataError where the file lists images not in `data`."""
    split_path = Path(split_file)
    if split_path.exists():
        record = load_split(split_path)
        held_out = held_out_mask(data, record)
        if held_out.sum() != len(record["val"]):
            raise DataError(f"{split_file}: lists {len(record['val'])} images, {held_out.sum()} of them are in "
                            f"{data.origin or 'the data set'}")
        return np.flatnonzero(~held_out), np.flatnonzero(held_out)
    train_idx, val_idx = stratified_split(data.labels, per_class, seed)
    save_split(split_path, data, val_idx, seed, origin=data.origin)
    print(f"wrote the validation split ({len(val_idx)} images) to {split_file}", file=sys.stderr)
    return train_idx, val_idx


def _read_tar(path: Path, split: str) -> LabeledImages:
    try:
        with tarfile.open(path) as tar:
            members = [m for m in tar.getmembers() if m.isfile()]
            if any(m.name.split("/")[0] == PYTHON_TARBALL_DIR for m in members):
                return _read_python_batches(path, tar, members, split)
            return _read_class_folders(
                path, ((m.name, lambda m=m: tar.extractfile(m).read()) for m in members)
            )
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"{path}: unreadable archive ({exc})") from None


def _read_python_batches(path: Path, tar: tarfile.TarFile, members, split: str) -> LabeledImages:
    wanted = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    names = wanted["train"] + wanted["test"] if split == "all" else wanted.get(split, wanted["train"])
    by_name = {m.name.split("/")[-1]: m for m in members}
    images, labels, sources = [], [], []
    for name in names:
        if name not in by_name:
            raise DataError(f"{path}: missing {PYTHON_TARBALL_DIR}/{name}")
        try:
            batch = pickle.load(tar.extractfile(by_name[name]), encoding="bytes")
            pixels = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            batch_labels = np.asarray(batch[b"labels"], dtype=np.int64)
        except Exception as exc:  # a corrupt pickle can raise nearly anything
            raise DataError(f"{path}: corrupt {PYTHON_TARBALL_DIR}/{name} ({exc})") from None
        if len(pixels) != len(batch_labels):
            raise DataError(f"{path}: {name} has {len(pixels)} images but {len(batch_labels)} labels")
        images.extend(pixels)
        labels.append(batch_labels)
        sources.extend(f"{name}/{i}" for i in range(len(pixels)))
    return LabeledImages(list(images), np.concatenate(labels), sources, format="python")


def _read_class_folders_dir(path: Path) -> LabeledImages:
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return _read_class_folders(path, ((p.relative_to(path).as_posix(), p.read_bytes) for p in files))


def _read_class_folders(path: Path, entries) -> LabeledImages:
    """entries: (relative name, () -> bytes); the class is the image's parent folder name."""
    found = []
    for name, read in entries:
        parts = name.split("/")
        if not name.lower().endswith(SUFFIXES) or any(p.startswith(".") for p in parts):
            continue
        if len(parts) < 2 or parts[-2] not in CLASSES:
            raise DataError(
                f"{path}: {name} is not in a folder named after a CIFAR-10 class ({', '.join(CLASSES)})"
            )
        try:
            image = decode_image(read())
        except ImageError as exc:
            raise DataError(f"{path}: {name}: {exc}") from None
        found.append((CLASSES.index(parts[-2]), name, np.asarray(image)))
    if not found:
        raise DataError(f"{path}: no images in class folders (expected e.g. airplane/0000.jpg)")
    found.sort(key=lambda item: (item[0], item[1]))
    return LabeledImages(
        [image for _, _, image in found],
        np.array([label for label, _, _ in found], dtype=np.int64),
        [name for _, name, _ in found],
    )


def stratified_split(labels: np.ndarray, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices): `per_class` images of each class held out, seeded."""
    rng = np.random.default_rng(seed)
    val = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) <= per_class:
            raise DataError(f"class {CLASSES[label]} has {len(members)} images, not more than {per_class}")
        val.append(rng.choice(members, size=per_class, replace=False))
    val = np.sort(np.concatenate(val))
    train = np.setdiff1d(np.arange(len(labels)), val)
    return train, val


def save_split(path: str | Path, data: LabeledImages, val_indices: np.ndarray, seed: int, origin: str) -> None:
    record = {
        "origin": origin,
        "seed": seed,
        "per_class": int(len(val_indices) // len(np.unique(data.labels))),
        "val": [data.sources[i] for i in val_indices],
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(record, indent=0) + "\n")


def load_split(path: str | Path) -> dict:
    try:
        record = json.loads(Path(path).read_text())
        if not isinstance(record, dict) or not isinstance(record.get("val"), list):
            raise ValueError("no 'val' list")
        return record
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a validation-split file ({exc})") from None

