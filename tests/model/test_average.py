"""python -m model.average: a warm restart's last weights averaged with the weights it started from."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from model.average import average_run, average_state, main
from model.files import sha256_file
from model.ship import ship
from model.train import plot_curves
from tests.model.test_ship import history_entry


def test_the_average_is_the_mean_of_each_parameter_with_subnormal_values_set_to_zero():
    first = {"w": np.array([1.0, -3.0, 2e-38], dtype=np.float32), "b": np.array([0.5], dtype=np.float32)}
    second = {"w": np.array([2.0, 1.0, -1.9e-38], dtype=np.float32), "b": np.array([0.25], dtype=np.float32)}
    averaged = average_state(first, second)
    assert averaged["w"].dtype == np.float32
    np.testing.assert_array_equal(averaged["w"], np.array([1.5, -1.0, 0.0], dtype=np.float32))  # 5e-40: subnormal
    np.testing.assert_array_equal(averaged["b"], np.array([0.375], dtype=np.float32))
    with pytest.raises(ValueError, match="different parameters"):
        average_state(first, {"w": second["w"]})
    with pytest.raises(ValueError, match="w: shapes"):
        average_state(first, {**second, "w": np.zeros(2, dtype=np.float32)})


@pytest.fixture
def restart(paddle, tmp_path):
    """A finished warm restart (2 of 2 epochs, weight average kept) and the weights it started from,
    the best of a first run of 50 epochs."""
    from model.alexnet import AlexNet_ACmix

    paddle.seed(3)
    start = tmp_path / "weights" / "alexnet_acmix.pdparams"
    start.parent.mkdir()
    paddle.save(AlexNet_ACmix().state_dict(), str(start))
    folder = tmp_path / "restart"
    folder.mkdir()
    paddle.seed(4)
    paddle.save(AlexNet_ACmix().state_dict(), str(folder / "last.pdema"))
    config = {"arch": "alexnet_acmix", "epochs": 50, "batch_size": 128, "lr": 0.001, "weight_decay": 1e-05,
              "label_smoothing": 0.1, "seed": 42, "max_steps_per_epoch": None}
    first = {"config": config, "history": [history_entry(e, 0.3 + e / 100) for e in range(1, 51)],
             "best": {"epoch": 48, "val_accuracy": 0.78}}
    history = [history_entry(1, 0.79), history_entry(2, 0.77)]
    (start.parent / "training_metrics.json").write_text(json.dumps(first))  # as model.ship leaves it
    record = {"config": {**config, "epochs": 2, "lr": 2e-4, "ema": 0.999, "init_weights": str(start)},
              "history": history, "best": {"epoch": 1, "val_accuracy": 0.79}, "parent": first,
              "init_weights_sha256": sha256_file(start)}
    (folder / "metrics.json").write_text(json.dumps(record))
    plot_curves(history, folder / "curves.png")
    return folder, start


def test_an_averaged_run_holds_the_mean_weights_and_a_record_that_ships_with_both_sources(restart, folder_dataset,
                                                                                          tmp_path):
    import paddle

    folder, start = restart
    root, labels = folder_dataset
    out = tmp_path / "averaged"
    record = average_run(folder, out, str(root), "unused.json", split="all")

    averaged = paddle.load(str(out / "best.pdparams"))
    first, second = paddle.load(str(start)), paddle.load(str(folder / "last.pdema"))
    for name in first:
        expected = ((first[name].numpy().astype(np.float64) + second[name].numpy()) / 2).astype(np.float32)
        np.testing.assert_array_equal(averaged[name].numpy(), expected)
    parent, last = record["average"]["sources"]
    assert parent["path"] == str(start) and parent["epoch"] == 48 and parent["val_accuracy"] == 0.78
    assert parent["sha256"] == sha256_file(start)
    assert last["path"] == str(folder / "last.pdema") and last["epoch"] == 2 and last["val_accuracy"] == 0.77
    assert record["best"] == {"epoch": 2, "val_accuracy": record["average"]["val_accuracy"]}
    assert json.loads((out / "metrics.json").read_text()) == record
    assert (out / "curves.png").read_bytes() == (folder / "curves.png").read_bytes()

    evaluation = ship(out, str(root), "unused.json", out=tmp_path / "shipped", split="all")
    assert evaluation["accuracy"] == pytest.approx(record["average"]["val_accuracy"])  # the same weights
    card = (tmp_path / "shipped" / "README.md").read_text()
    assert ("Complete: the uniform average of the best weights (epoch 48, validation accuracy 0.7800) of a run of "
            "50 epochs and of the weight average after the last epoch (2) of a run of 2 epochs started from them; "
            "below the target.") in card
    assert "| 50 / 50 + 2 / 2 (averaged: epoch 48 of the first run with epoch 2 of the second run) |" in card
    # The first run's weights were shipped, and the restart started from them there.
    assert re.search(r"python -m model.train --out runs/alexnet_acmix_run1\npython -m model.ship --run "
                     rf"runs/alexnet_acmix_run1\npython -m model.train --out {folder} .*--init-weights {start}"
                     rf".*\npython -m model.average --run {folder} --out {out}\npython -m model.ship --run {out}\n", card)
    assert (f"| the best of the first run (epoch 48), where the second run started (SHA-256 `{parent['sha256'][:12]}`)"
            " | 0.7800 |") in card
    assert f"| the second run after its last epoch (2; SHA-256 `{last['sha256'][:12]}`) | 0.7700 |" in card
    assert f"| their average (shipped) | **{record['average']['val_accuracy']:.4f}** |" in card


@pytest.mark.parametrize("spoil, message", [
    (lambda record: record["config"].pop("init_weights"), "not a warm restart"),
    (lambda record: record["history"].pop(), "1 of 2 epochs trained; average a finished restart"),
])
def test_what_is_no_finished_warm_restart_is_refused_in_one_line(restart, tmp_path, capsys, spoil, message):
    folder, _ = restart
    record = json.loads((folder / "metrics.json").read_text())
    spoil(record)
    (folder / "metrics.json").write_text(json.dumps(record))
    assert main(["--run", str(folder), "--out", str(tmp_path / "averaged")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "averaged").exists()


def test_the_averaged_run_needs_its_own_folder_and_its_sources(restart, tmp_path, capsys):
    folder, start = restart
    assert main(["--run", str(folder), "--out", str(folder)]) == 2
    assert "needs its own folder" in capsys.readouterr().err
    start.unlink()
    assert main(["--run", str(folder)]) == 2
    assert f"{start}: missing" in capsys.readouterr().err
    assert not folder.with_name("restart_averaged").exists()


@pytest.mark.parametrize("digest_recorded", [True, False])
def test_weights_saved_over_where_the_restart_started_are_refused(restart, tmp_path, capsys, digest_recorded):
    """Shipping replaces model/weights/alexnet_acmix.pdparams: averaging with what is there now would
    average with other weights. A run records the digest of its start (since session 18); for an older
    record the run record beside the weights must still be the restart's parent."""
    import paddle

    from model.alexnet import AlexNet_ACmix

    folder, start = restart
    if not digest_recorded:
        record = json.loads((folder / "metrics.json").read_text())
        del record["init_weights_sha256"]
        (folder / "metrics.json").write_text(json.dumps(record))
        shipped = json.loads((start.parent / "training_metrics.json").read_text())
        (start.parent / "training_metrics.json").write_text(json.dumps({**shipped, "best": {"epoch": 3, "val_accuracy": 0.9}}))
    paddle.seed(5)
    paddle.save(AlexNet_ACmix().state_dict(), str(start))  # other weights shipped since
    assert main(["--run", str(folder), "--out", str(tmp_path / "averaged")]) == 2
    assert f"error: {start}: no longer the weights {folder} started from" in capsys.readouterr().err
    assert not (tmp_path / "averaged").exists()
