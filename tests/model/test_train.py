"""Training on synthetic data: the loss falls, checkpoints resume exactly, artifacts are written."""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from model.data import LabeledImages
from tests.conftest import synthetic_images


def synthetic_split(per_class: int, seed: int) -> LabeledImages:
    images, labels = synthetic_images(per_class=per_class, seed=seed)
    return LabeledImages(list(images), labels, [f"synthetic/{i}" for i in range(len(labels))])


@pytest.fixture(scope="module")
def data():
    return synthetic_split(per_class=4, seed=0), synthetic_split(per_class=1, seed=1)


def config(**overrides):
    from model.train import TrainConfig

    values = dict(epochs=3, batch_size=8, lr=1e-3, max_steps_per_epoch=4, seed=3)
    values.update(overrides)
    return TrainConfig(**values)


def test_a_few_steps_lower_the_loss_and_write_the_artifacts(paddle, data, tmp_path):
    from model.train import train

    record = train(config(), *data, tmp_path)
    losses = [h["train_loss"] for h in record["history"]]
    assert len(losses) == 3 and losses[-1] < losses[0] * 0.8
    for name in ("best.pdparams", "last.pdparams", "last.pdopt", "metrics.json", "curves.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["best"]["val_accuracy"] == max(h["val_accuracy"] for h in saved["history"])


def test_resume_continues_where_it_stopped(paddle, data, tmp_path):
    from model.train import train

    straight = train(config(epochs=2), *data, tmp_path / "straight")
    train(config(epochs=2), *data, tmp_path / "split", until_epoch=1)
    resumed = train(config(epochs=2), *data, tmp_path / "split", resume=True)
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]
    a = paddle.load(str(tmp_path / "straight" / "last.pdparams"))
    b = paddle.load(str(tmp_path / "split" / "last.pdparams"))
    for key in a:
        np.testing.assert_allclose(b[key].numpy(), a[key].numpy(), rtol=1e-4, atol=1e-6, err_msg=key)
    assert resumed["history"][-1]["train_loss"] == pytest.approx(straight["history"][-1]["train_loss"], rel=1e-3)


def test_a_run_killed_while_saving_leaves_the_previous_checkpoint_resumable(paddle, data, tmp_path, monkeypatch):
    from model.train import train

    straight = train(config(epochs=2), *data, tmp_path / "straight")
    train(config(epochs=2), *data, tmp_path / "split", until_epoch=1)
    real_save = paddle.save

    def dies_writing_the_weights(obj, path):
        real_save(obj, path)
        if "last.pdparams" in path:
            Path(path).write_bytes(Path(path).read_bytes()[:100])  # a partly written file
            raise KeyboardInterrupt

    monkeypatch.setattr(paddle, "save", dies_writing_the_weights)
    with pytest.raises(KeyboardInterrupt):
        train(config(epochs=2), *data, tmp_path / "split", resume=True)  # epoch 2 dies while saving
    monkeypatch.setattr(paddle, "save", real_save)
    resumed = train(config(epochs=2), *data, tmp_path / "split", resume=True)
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]
    assert resumed["history"][-1]["train_loss"] == pytest.approx(straight["history"][-1]["train_loss"], rel=1e-3)


def test_resume_refuses_a_checkpoint_ahead_of_its_metrics(paddle, data, tmp_path):
    from model.train import train

    train(config(epochs=2), *data, tmp_path)
    record = json.loads((tmp_path / "metrics.json").read_text())
    record["history"] = record["history"][:1]  # as if killed after last.pdopt, before metrics.json
    (tmp_path / "metrics.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="last.pdopt is at step 8, metrics.json records 1 epochs of 4 steps"):
        train(config(epochs=2), *data, tmp_path, resume=True)


def test_resume_refuses_another_configuration(paddle, data, tmp_path):
    from model.train import train

    train(config(epochs=1), *data, tmp_path)
    with pytest.raises(ValueError, match="another configuration"):
        train(config(epochs=1, lr=5e-4), *data, tmp_path, resume=True)


def test_label_smoothing_matches_its_definition(paddle):
    from model.train import smoothed_cross_entropy

    logits = np.array([[2.0, 0.0, -1.0]], dtype=np.float32)
    log_p = logits - np.log(np.exp(logits).sum())
    expected = 0.9 * -log_p[0, 1] + 0.1 * -log_p[0].mean()
    got = float(smoothed_cross_entropy(paddle.to_tensor(logits), paddle.to_tensor(np.array([1])), 0.1))
    assert got == pytest.approx(expected, rel=1e-6)


def test_a_cutmixed_loss_weighs_both_labels_by_the_area_each_image_holds(paddle):
    from model.augmentation import Mix
    from model.train import smoothed_cross_entropy, training_loss

    logits = paddle.to_tensor(np.random.default_rng(0).normal(size=(4, 10)).astype(np.float32))
    labels, partner = np.array([0, 1, 2, 3]), np.array([2, 0, 3, 1])
    own = float(smoothed_cross_entropy(logits, paddle.to_tensor(labels), 0.1))
    theirs = float(smoothed_cross_entropy(logits, paddle.to_tensor(labels[partner]), 0.1))
    assert float(training_loss(logits, labels, None, 0.1)) == pytest.approx(own, rel=1e-6)
    assert float(training_loss(logits, labels, Mix(partner, 0.3), 0.1)) == pytest.approx(0.3 * own + 0.7 * theirs, rel=1e-6)
    assert own != pytest.approx(theirs)


def test_cutmix_mixes_the_batches_it_draws_and_leaves_runs_without_it_unchanged(paddle, data, tmp_path):
    from model.train import train, train_batches

    augment = config(augment="translate").augmentation()
    plain = list(train_batches(data[0], 8, augment, np.random.default_rng(2), 4))
    off = list(train_batches(data[0], 8, augment, np.random.default_rng(2), 4, cutmix=0.0))
    mixed = list(train_batches(data[0], 8, augment, np.random.default_rng(2), 4, cutmix=1.0))
    assert all(mix is None for *_, mix in plain + off)
    for (a, labels_a, _), (b, labels_b, _) in zip(plain, off, strict=True):  # no random draw when off
        np.testing.assert_array_equal(a.across, b.across)
        np.testing.assert_array_equal(labels_a, labels_b)
    assert all(mix is not None and 0.0 <= mix.lam <= 1.0 for *_, mix in mixed)
    assert any(not np.array_equal(a.across, b.across) for (a, *_), (b, *_) in zip(plain, mixed, strict=True))

    record = train(config(augment="translate", cutmix=0.5), *data, tmp_path)
    assert record["config"]["cutmix"] == 0.5 and len(record["history"]) == 3
    assert all(np.isfinite(h["train_loss"]) for h in record["history"])


def test_cli_reports_a_missing_data_set_in_one_line(capsys, tmp_path):
    from model.train import main

    assert main(["--data", str(tmp_path / "none.tar.gz"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {tmp_path / 'none.tar.gz'}: no such file or directory"]


def test_cli_names_an_out_that_is_a_file_and_init_weights_that_are_a_folder(capsys, tmp_path, folder_dataset):
    from model.train import main

    (tmp_path / "run").write_text("a file")
    assert main(["--data", str(folder_dataset[0]), "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'run'}: a file, not a folder for the run (--out)"
    assert main(["--data", str(folder_dataset[0]), "--out", str(tmp_path / "new"), "--init-weights", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path}: a folder, not a weights file"


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "0"], "epochs 0 is out of range (--epochs: at least 1)"),  # was a TypeError after no epoch
    (["--batch-size", "0"], "batch_size 0 is out of range (--batch-size: at least 1)"),  # was a ZeroDivisionError
    (["--max-steps-per-epoch", "0"], "max_steps_per_epoch 0 is out of range"),
    (["--lr", "0"], "lr 0.0 is out of range (--lr: above 0)"),
    (["--dropout", "1"], "dropout 1.0 is out of range (--dropout: in [0, 1))"),
    (["--weight-decay", "inf"], "weight_decay inf is out of range (--weight-decay: at least 0)"),  # trained to nan
    (["--momentum", "nan"], "momentum nan is out of range"),
    (["--weight-decay", "-1"], "weight_decay -1.0 is out of range"),
    (["--cutmix", "1.5"], "cutmix 1.5 is out of range (--cutmix: in [0, 1])"),
    (["--train-per-class", "0"], "train_per_class 0 is out of range (--train-per-class: at least 1)"),
    (["--resume"], "no checkpoint (last.pdparams) to resume"),  # was a fresh run, silently
])
def test_cli_refuses_a_recipe_out_of_range_or_a_resume_without_checkpoint_in_one_line(capsys, tmp_path, flags, message):
    from model.train import main

    assert main([*flags, "--data", str(tmp_path / "none.tar.gz"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


@pytest.mark.parametrize("text, message", [("{oops", "not a run record (Expecting property name"),
                                           ("{}", "not a run record (no config, history and best)"),
                                           ("[]", "not a run record (no config")])
def test_a_record_that_is_not_one_is_named(tmp_path, text, message):
    from model.data import DataError
    from model.train import read_run_record

    (tmp_path / "metrics.json").write_text(text)
    with pytest.raises(DataError, match=f"metrics.json: {re.escape(message)}"):
        read_run_record(tmp_path / "metrics.json")


def test_resume_names_a_checkpoint_file_that_is_not_one(paddle, data, tmp_path):
    from model.data import DataError
    from model.train import train

    train(config(epochs=2), *data, tmp_path / "run", until_epoch=1)
    (tmp_path / "run" / "last.pdopt").write_text("garbage")
    with pytest.raises(DataError, match="last.pdopt: not a Paddle checkpoint"):
        train(config(epochs=2), *data, tmp_path / "run", resume=True)


def test_init_weights_of_another_network_are_refused(paddle, data, tmp_path):
    """Paddle only warns and keeps the fresh parameters; the run would train from scratch unawares."""
    from model.alexnet import AlexNet
    from model.train import train

    paddle.save(AlexNet().state_dict(), str(tmp_path / "plain.pdparams"))
    with pytest.raises(ValueError, match="plain.pdparams: not alexnet_acmix weights"):
        train(config(init_weights=str(tmp_path / "plain.pdparams")), *data, tmp_path / "run")


def shipped_folder(run: Path, folder: Path, best_epoch: int) -> Path:
    """What model.ship leaves, from a run's last checkpoint declared its best epoch."""
    import shutil

    from model.train import SHIPPED_METRICS, SHIPPED_WEIGHTS

    folder.mkdir()
    shutil.copyfile(run / "last.pdparams", folder / SHIPPED_WEIGHTS)
    record = json.loads((run / "metrics.json").read_text())
    record["best"] = {"epoch": best_epoch, "val_accuracy": record["history"][best_epoch - 1]["val_accuracy"]}
    (folder / SHIPPED_METRICS).write_text(json.dumps(record))
    return folder


def test_continue_from_shipped_weights_keeps_history_and_schedule(paddle, data, tmp_path):
    from model.train import train

    straight = train(config(epochs=3), *data, tmp_path / "straight")
    train(config(epochs=3), *data, tmp_path / "first", until_epoch=2)
    shipped = shipped_folder(tmp_path / "first", tmp_path / "shipped", best_epoch=2)
    record = train(config(epochs=3), *data, tmp_path / "fresh", continue_from=shipped)
    assert [h["epoch"] for h in record["history"]] == [1, 2, 3]
    first = json.loads((tmp_path / "first" / "metrics.json").read_text())
    assert record["history"][:2] == first["history"]
    assert record["history"][-1]["lr"] == pytest.approx(straight["history"][-1]["lr"], rel=1e-6)
    # Same weights and batches, fresh Adam moments: close to the uninterrupted run, not identical.
    assert record["history"][-1]["train_loss"] == pytest.approx(straight["history"][-1]["train_loss"], rel=0.2)
    assert (tmp_path / "fresh" / "best.pdparams").is_file()


def test_continue_from_refuses_a_folder_without_a_shipped_run_or_another_config(paddle, data, tmp_path):
    from model.data import DataError
    from model.train import train

    with pytest.raises(DataError, match="alexnet_acmix.pdparams: missing"):
        train(config(epochs=2), *data, tmp_path / "a", continue_from=tmp_path)
    train(config(epochs=2), *data, tmp_path / "first", until_epoch=1)
    shipped = shipped_folder(tmp_path / "first", tmp_path / "shipped", best_epoch=1)
    with pytest.raises(ValueError, match="another configuration"):
        train(config(epochs=2, lr=5e-4), *data, tmp_path / "b", continue_from=shipped)


def test_continue_from_refuses_a_complete_run(paddle, data, tmp_path):
    from model.train import train

    train(config(epochs=2), *data, tmp_path / "first")
    shipped = shipped_folder(tmp_path / "first", tmp_path / "shipped", best_epoch=1)
    with pytest.raises(ValueError, match=r"its run is complete \(2 epochs\); nothing to continue"):
        train(config(epochs=2), *data, tmp_path / "again", continue_from=shipped)


def test_init_weights_starts_a_new_run_that_records_its_parent(paddle, data, tmp_path):
    from model.files import sha256_file
    from model.train import train

    first = train(config(epochs=2), *data, tmp_path / "first")
    finetune = config(epochs=2, lr=1e-4, rotation=0.0, crop_scale_min=0.8, jitter=0.1,
                      init_weights=str(tmp_path / "first" / "best.pdparams"))
    record = train(finetune, *data, tmp_path / "finetune")
    assert record["parent"] == first
    assert record["init_weights_sha256"] == sha256_file(tmp_path / "first" / "best.pdparams")
    assert [h["epoch"] for h in record["history"]] == [1, 2]
    # Its own cosine schedule from 1e-4: halfway after epoch 1 of 2.
    assert record["history"][0]["lr"] == pytest.approx(0.5e-4, rel=1e-6)
    # It started from the parent's weights, not from a fresh initialization.
    assert record["history"][0]["train_loss"] < first["history"][0]["train_loss"]
    assert json.loads((tmp_path / "finetune" / "metrics.json").read_text())["config"]["rotation"] == 0.0


def test_the_augmentation_follows_the_configuration():
    from model.train import TrainConfig

    augment = TrainConfig(crop_scale_min=0.8, rotation=0.0, jitter=0.1).augmentation()
    assert (augment.crop_scale, augment.rotation, augment.jitter) == ((0.8, 1.0), 0.0, 0.1)
    reference = TrainConfig().augmentation()
    assert (reference.crop_scale, reference.rotation, reference.jitter) == ((0.6, 1.0), 20.0, 0.2)


def test_a_record_written_before_the_augmentation_fields_reads_as_the_reference_recipe(tmp_path):
    from model.train import TrainConfig, check_same_config

    old = {"config": {"arch": "alexnet_acmix", "epochs": 50, "batch_size": 128, "lr": 0.001, "weight_decay": 1e-05,
                      "label_smoothing": 0.1, "seed": 42, "max_steps_per_epoch": None}}
    check_same_config(old, TrainConfig(), tmp_path)
    with pytest.raises(ValueError, match=r"another configuration \(rotation=20.0\)"):
        check_same_config(old, TrainConfig(rotation=0.0), tmp_path)
    with pytest.raises(ValueError, match=r"another configuration \(dropout=0.5\)"):
        check_same_config(old, TrainConfig(dropout=0.3), tmp_path)


def test_dropout_is_a_recipe_setting_that_changes_no_parameter(paddle, tmp_path):
    from model.alexnet import build_model
    from model.ship import recipe_text
    from model.train import start_session

    session = start_session(config(dropout=0.2), train_size=64, out=tmp_path, resume=False, continue_from=None)
    assert [layer.p for layer in session.model.sublayers() if isinstance(layer, paddle.nn.Dropout)] == [0.2, 0.2]
    shapes = {name: tuple(value.shape) for name, value in session.model.state_dict().items()}
    assert shapes == {name: tuple(value.shape) for name, value in build_model().state_dict().items()}
    assert "dropout 0.2;" in recipe_text(asdict(config(dropout=0.2)))


def test_cli_resume_takes_the_recorded_configuration_and_refuses_a_differing_flag(paddle, folder_dataset, tmp_path,
                                                                                  capsys):
    from model.train import main

    root, _ = folder_dataset
    out = tmp_path / "run"
    common = ["--data", str(root), "--split-file", str(tmp_path / "split.json"), "--val-per-class", "1",
              "--out", str(out)]
    assert main([*common, "--epochs", "2", "--batch-size", "4", "--lr", "5e-4", "--rotation", "0",
                 "--until-epoch", "1"]) == 0
    assert main([*common, "--resume"]) == 0  # no recipe flags: the recorded ones
    record = json.loads((out / "metrics.json").read_text())
    assert len(record["history"]) == 2
    assert (record["config"]["lr"], record["config"]["rotation"], record["config"]["batch_size"]) == (5e-4, 0.0, 4)
    capsys.readouterr()
    assert main([*common, "--resume", "--lr", "1e-3"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {out} holds a run with another configuration (lr=0.0005)"]


def test_a_per_class_subset_keeps_as_many_of_each_class_drawn_by_the_seed():
    from model.data import DataError
    from model.train import per_class_subset

    labels = np.repeat(np.arange(10), 50)
    indices = np.arange(0, 500, 2)  # 25 of each class
    kept = per_class_subset(labels, indices, 7, seed=1)
    assert np.isin(kept, indices).all() and list(kept) == sorted(kept)
    assert np.bincount(labels[kept]).tolist() == [7] * 10
    assert np.array_equal(kept, per_class_subset(labels, indices, 7, seed=1))
    assert not np.array_equal(kept, per_class_subset(labels, indices, 7, seed=2))
    assert np.array_equal(per_class_subset(labels, indices, 25, seed=1), indices)  # every image of each class
    with pytest.raises(DataError, match="--train-per-class 26: class 0 has 25 training images"):
        per_class_subset(labels, indices, 26, seed=1)


def test_cli_trains_on_a_per_class_subset_and_records_it(paddle, folder_dataset, tmp_path, capsys):
    from model.train import main

    root, _ = folder_dataset  # 3 images per class, 1 held out
    common = ["--data", str(root), "--split-file", str(tmp_path / "split.json"), "--val-per-class", "1",
              "--epochs", "1", "--batch-size", "5"]
    assert main([*common, "--train-per-class", "1", "--out", str(tmp_path / "one")]) == 0
    assert main([*common, "--out", str(tmp_path / "all")]) == 0
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    every = json.loads((tmp_path / "all" / "metrics.json").read_text())
    assert one["config"]["train_per_class"] == 1 and every["config"]["train_per_class"] is None
    assert (one["train_images"], every["train_images"]) == (10, 20)
    capsys.readouterr()
    assert main([*common, "--train-per-class", "3", "--out", str(tmp_path / "three")]) == 2
    assert capsys.readouterr().err.strip() == "error: --train-per-class 3: class 0 has 2 training images"


def test_saved_weights_and_checkpoints_hold_no_subnormal_numbers(paddle, data, tmp_path):
    from model.alexnet import build_model
    from model.subnormals import count_subnormals
    from model.train import train
    from tests.conftest import subnormal_float32

    model = build_model()
    state = model.state_dict()
    dead = state["classifier.3.weight"].numpy().copy()
    dead[:, :100] = subnormal_float32(0x0020AA2E)  # ~3e-39: what weight decay leaves of dead units
    state["classifier.3.weight"] = paddle.to_tensor(dead)
    dirty = tmp_path / "dirty.pdparams"
    paddle.save(state, str(dirty))
    assert count_subnormals(paddle.load(str(dirty))["classifier.3.weight"].numpy()) == dead.shape[0] * 100
    # The smallest positive lr (a subnormal itself; 0 is refused): Adam's steps are ~lr, so training
    # leaves the subnormal weights subnormal, and only the flush on save can take them out.
    train(config(epochs=1, lr=1e-45, init_weights=str(dirty)), *data, tmp_path / "run")
    for name in ("best.pdparams", "last.pdparams", "last.pdopt"):
        saved = paddle.load(str(tmp_path / "run" / name))
        found = {key: count_subnormals(value.numpy()) for key, value in saved.items() if hasattr(value, "numpy")}
        assert sum(found.values()) == 0, (name, {k: v for k, v in found.items() if v})


def test_the_weight_average_follows_its_definition_and_leaves_the_model_alone(paddle):
    from model.alexnet import build_model
    from model.train import WeightAverage

    paddle.seed(0)
    model = build_model("alexnet")
    start = {n: p.numpy().copy() for n, p in model.named_parameters()}
    average = WeightAverage(model, decay=0.9)
    expected = dict(start)
    for step in range(3):
        for p in model.parameters():
            p.set_value(p.numpy() + 0.5 * (step + 1))
        average.update()
        expected = {n: 0.9 * expected[n] + 0.1 * p.numpy() for n, p in model.named_parameters()}
    for name, value in average.state_dict().items():
        np.testing.assert_allclose(value.numpy(), expected[name], rtol=1e-5, atol=1e-6, err_msg=name)
        assert not np.allclose(value.numpy(), dict(model.named_parameters())[name].numpy())


def test_with_an_average_the_run_keeps_the_averaged_weights_and_resumes_it(paddle, data, tmp_path):
    from model.alexnet import build_model
    from model.predict import predict_logits
    from model.train import train

    straight = train(config(epochs=2, ema=0.5), *data, tmp_path / "straight")
    for entry in straight["history"]:
        assert {"raw_val_accuracy", "raw_val_loss", "val_accuracy"} <= set(entry)
    best = paddle.load(str(tmp_path / "straight" / "best.pdparams"))
    last = paddle.load(str(tmp_path / "straight" / "last.pdparams"))
    average = paddle.load(str(tmp_path / "straight" / "last.pdema"))
    key = "classifier.0.weight"
    assert not np.allclose(average[key].numpy(), last[key].numpy())  # the trained weights are not the average's
    if straight["best"]["epoch"] == 2:
        np.testing.assert_array_equal(best[key].numpy(), average[key].numpy())
    # The recorded validation figure is the kept weights' own.
    model = build_model("alexnet_acmix")
    model.set_state_dict(best)
    val = data[1]
    accuracy = float((predict_logits(model, val.images).argmax(1) == val.labels).mean())
    assert accuracy == pytest.approx(straight["best"]["val_accuracy"])

    train(config(epochs=2, ema=0.5), *data, tmp_path / "split", until_epoch=1)
    train(config(epochs=2, ema=0.5), *data, tmp_path / "split", resume=True)
    resumed = paddle.load(str(tmp_path / "split" / "last.pdema"))
    for name in average:
        np.testing.assert_allclose(resumed[name].numpy(), average[name].numpy(), rtol=1e-4, atol=1e-6, err_msg=name)


def test_translate_augmentation_trains_through_the_fast_first_layer(paddle, data, tmp_path, monkeypatch):
    import model.train as training

    fast_steps = []
    forward = training.forward_from_source
    monkeypatch.setattr(training, "forward_from_source", lambda model, batch: fast_steps.append(1) or forward(model, batch))
    record = training.train(config(augment="translate", jpeg=0.5), *data, tmp_path)
    losses = [h["train_loss"] for h in record["history"]]
    assert len(fast_steps) == 3 * 4 and losses[-1] < losses[0] * 0.8
