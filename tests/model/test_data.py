"""Both data formats on small archives made here, the validation split, and bad-data errors."""

from __future__ import annotations

import numpy as np
import pytest

from model.data import CLASSES, DataError, load_split, open_dataset, save_split, stratified_split
from tests.conftest import jpeg_bytes, synthetic_images, write_python_tarball, write_tar


def test_python_tarball_train_and_test_splits(tmp_path):
    train = synthetic_images(per_class=2, seed=1)
    test = synthetic_images(per_class=1, seed=2)
    path = write_python_tarball(tmp_path / "cifar-10-python.tar.gz", train, test)

    data = open_dataset(path, split="train")
    assert data.format == "python"
    assert len(data) == 20
    np.testing.assert_array_equal(np.stack(data.images), train[0])  # pixels exactly, HWC order
    np.testing.assert_array_equal(data.labels, train[1])
    assert len(open_dataset(path, split="test")) == 10
    assert len(open_dataset(path, split="all")) == 30


@pytest.mark.parametrize("container", ["dir", "tar", "tar.gz"])
def test_class_folders_as_folder_or_archive(tmp_path, folder_dataset, container):
    root, labels = folder_dataset
    if container == "dir":
        path = root
    else:
        files = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.png"))}
        path = write_tar(tmp_path / f"images.{container}", files, "w:gz" if container == "tar.gz" else "w")
    data = open_dataset(path)
    assert len(data) == len(labels)
    assert sorted(data.labels.tolist()) == sorted(labels.tolist())
    for source, label in zip(data.sources, data.labels, strict=True):
        assert source.split("/")[-2] == CLASSES[label]
    assert data.images[0].shape == (32, 32, 3) and data.images[0].dtype == np.uint8


def test_the_shared_archive_reads_in_place(shared_data):
    data = open_dataset(shared_data)
    assert len(data) == 50_000
    assert np.bincount(data.labels).tolist() == [5000] * 10
    assert data.sources[0] == "train/airplane/0000.jpg"


def test_stratified_split_is_seeded_balanced_and_disjoint():
    labels = np.repeat(np.arange(10), 30)
    train, val = stratified_split(labels, per_class=5, seed=7)
    assert len(val) == 50 and np.bincount(labels[val]).tolist() == [5] * 10
    assert not set(train) & set(val) and len(train) + len(val) == len(labels)
    np.testing.assert_array_equal(val, stratified_split(labels, per_class=5, seed=7)[1])
    assert not np.array_equal(val, stratified_split(labels, per_class=5, seed=8)[1])


def test_split_file_selects_val_and_excludes_it_from_train(tmp_path, folder_dataset):
    root, _ = folder_dataset
    data = open_dataset(root)
    _, val = stratified_split(data.labels, per_class=1, seed=0)
    split_file = tmp_path / "split.json"
    save_split(split_file, data, val, seed=0, origin="test")
    assert load_split(split_file)["seed"] == 0

    held_out = open_dataset(root, split="val", val_split=split_file)
    rest = open_dataset(root, split="train", val_split=split_file)
    assert sorted(held_out.sources) == sorted(data.sources[i] for i in val)
    assert len(rest) == len(data) - len(val) and not set(rest.sources) & set(held_out.sources)


def test_missing_path_is_named(tmp_path):
    with pytest.raises(DataError, match="nope.tar.gz: no such file"):
        open_dataset(tmp_path / "nope.tar.gz")


def test_archive_of_the_wrong_layout_is_named(tmp_path):
    image = jpeg_bytes(synthetic_images(per_class=1)[0][0])
    path = write_tar(tmp_path / "flat.tar.gz", {"images/0001.jpg": image})
    with pytest.raises(DataError, match=r"flat.tar.gz: images/0001.jpg is not in a folder named after a CIFAR-10"):
        open_dataset(path)
    empty = write_tar(tmp_path / "empty.tar", {"README": b"hello"}, "w")
    with pytest.raises(DataError, match="no images in class folders"):
        open_dataset(empty)


def test_corrupt_image_is_named(tmp_path):
    good = jpeg_bytes(synthetic_images(per_class=1)[0][0])
    path = write_tar(tmp_path / "bad.tar.gz", {"train/cat/0001.jpg": good, "train/dog/0002.jpg": good[:40]})
    with pytest.raises(DataError, match=r"bad.tar.gz: train/dog/0002.jpg: corrupt or truncated image"):
        open_dataset(path)


def test_not_an_archive_and_corrupt_batches_are_named(tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(DataError, match="junk.bin: not a folder"):
        open_dataset(junk)
    broken = write_tar(tmp_path / "cifar-10-python.tar.gz", {"cifar-10-batches-py/data_batch_1": b"garbage"})
    with pytest.raises(DataError, match="data_batch_1"):
        open_dataset(broken, split="train")


def test_a_data_set_of_class_folders_has_no_test_split_whether_a_folder_or_a_tar(folder_dataset, tmp_path):
    import tarfile

    with pytest.raises(DataError, match="a data set of class folders has no test split"):
        open_dataset(folder_dataset[0], split="test")
    archive = tmp_path / "folders.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder_dataset[0], arcname="train")
    with pytest.raises(DataError, match="folders.tar.gz: a data set of class folders has no test split"):
        open_dataset(archive, split="test")


def test_a_split_written_from_the_jpeg_archive_selects_the_same_images_in_the_lossless_one(tmp_path, folder_dataset):
    import json

    from model.data import image_key, split_indices

    root, _ = folder_dataset
    data = open_dataset(root)
    names = [source.replace(".png", ".jpg") for source in data.sources[::3]]  # recorded from the JPEG copy
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"origin": "cifar10-train-jpeg.tar.gz", "seed": 0, "per_class": 1, "val": names}))
    train_idx, val_idx = split_indices(data, split, per_class=1, seed=0)
    assert [image_key(data.sources[i]) for i in val_idx] == [image_key(n) for n in names]
    assert len(train_idx) + len(val_idx) == len(data) and not set(train_idx) & set(val_idx)
    assert len(open_dataset(root, split="val", val_split=split)) == len(names)
    assert image_key("train/cat/0042.png") == image_key("train/cat/0042.jpg") == "train/cat/0042"


@pytest.mark.parametrize("text, message", [("[1, 2]", "no 'val' list"), ('{"val": 3}', "no 'val' list"),
                                           ("{oops", "Expecting property name")])
def test_a_split_file_that_is_not_one_is_named(tmp_path, text, message):
    (tmp_path / "split.json").write_text(text)
    with pytest.raises(DataError, match=f"split.json: not a validation-split file \\({message}"):
        load_split(tmp_path / "split.json")
