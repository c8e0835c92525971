"""python -m model.ship: a run's best weights into a weights folder, evaluated, with their card."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from model.data import DataError
from model.ship import main, ship
from model.train import plot_curves


def history_entry(epoch: int, val_accuracy: float) -> dict:
    return {"epoch": epoch, "lr": 1e-3, "train_loss": 2.0 - epoch / 10, "train_accuracy": 0.2 + epoch / 20,
            "val_loss": 1.9 - epoch / 10, "val_accuracy": val_accuracy, "train_images_per_s": 50.0,
            "epoch_seconds": 660.0 + epoch}


@pytest.fixture
def run(paddle, tmp_path):
    """A training run's folder as model.train leaves it: 2 of 50 epochs, best epoch 2."""
    from model.alexnet import AlexNet_ACmix

    folder = tmp_path / "run"
    folder.mkdir()
    paddle.seed(3)
    paddle.save(AlexNet_ACmix().state_dict(), str(folder / "best.pdparams"))
    history = [history_entry(1, 0.31), history_entry(2, 0.42)]
    config = {"arch": "alexnet_acmix", "epochs": 50, "batch_size": 128, "lr": 0.001, "weight_decay": 1e-05,
              "label_smoothing": 0.1, "seed": 42, "max_steps_per_epoch": None}
    (folder / "metrics.json").write_text(json.dumps({"config": config, "history": history,
                                                     "best": {"epoch": 2, "val_accuracy": 0.42}}))
    plot_curves(history, folder / "curves.png")
    return folder


def test_ship_copies_the_best_weights_and_writes_a_card_of_their_figures(run, folder_dataset, tmp_path):
    root, _ = folder_dataset
    out = tmp_path / "weights"
    evaluation = ship(run, str(root), "unused.json", out=out, split="all")

    assert (out / "alexnet_acmix.pdparams").read_bytes() == (run / "best.pdparams").read_bytes()
    assert json.loads((out / "training_metrics.json").read_text())["best"]["epoch"] == 2
    for png in ("learning_curves.png", "confusion_matrix.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (out / "README.md").read_text()
    assert f"**{evaluation['accuracy']:.4f}**" in card
    assert "| epochs trained / planned | 2 / 50 (best: epoch 2) |" in card
    assert "the best weights (epoch 2) of the first 2 epochs of a 50-epoch run" in card
    assert all(f"| {name} | {value:.4f} |" in card for name, value in evaluation["per_class"].items())
    assert "| 2 | 1.00e-03 | 1.8000 | 0.3000 | 1.7000 | 0.4200 | 11.0 |" in card
    assert evaluation["n"] == 30


def test_the_card_of_a_fine_tune_names_both_stages(run, folder_dataset, tmp_path):
    root, _ = folder_dataset
    first = json.loads((run / "metrics.json").read_text())
    first["history"] = [history_entry(epoch, 0.3 + epoch / 100) for epoch in range(1, 51)]
    first["best"] = {"epoch": 50, "val_accuracy": 0.8}
    finetune = {"config": {**first["config"], "epochs": 8, "lr": 1e-4, "crop_scale_min": 0.8, "rotation": 0.0,
                           "jitter": 0.1, "init_weights": "runs/alexnet_acmix/best.pdparams"},
                "history": [history_entry(1, 0.81), history_entry(2, 0.82)],
                "best": {"epoch": 2, "val_accuracy": 0.82}, "parent": first}
    (run / "metrics.json").write_text(json.dumps(finetune))

    ship(run, str(root), "unused.json", out=tmp_path / "weights", split="all")
    card = (tmp_path / "weights" / "README.md").read_text()
    assert ("**Work in progress:** the best weights (epoch 2) of the first 2 epochs of a fine-tune "
            "(8 epochs, lighter augmentation) of the best weights (epoch 50, validation accuracy 0.8000) of a 50-epoch run") in card
    assert "| epochs trained / planned | 50 / 50 + 2 / 8 (best: epoch 2 of the fine-tune) |" in card
    assert "python -m model.train  # then: make train\n" in card  # the first run: the defaults
    assert (f"python -m model.train --out {run} --epochs 8 --lr 0.0001 --crop-scale-min 0.8 --rotation 0 --jitter 0.1 "
            "--init-weights runs/alexnet_acmix/best.pdparams  # then: make finetune") in card
    assert "random resized crop 128 (scale 0.6–1), horizontal flip, rotation ±20°" in card
    assert "lr 0.0001 with cosine decay per step over the 8 epochs" in card
    assert "random resized crop 128 (scale 0.8–1), horizontal flip, no rotation" in card
    assert "| 50 | 1.00e-03 |" in card.split("Epochs of the fine-tune")[0]
    assert "| 2 | 1.00e-03 | 1.8000 | 0.3000 | 1.7000 | 0.8200 |" in card.split("Epochs of the fine-tune")[1]


def test_a_folder_that_is_no_run_is_refused_with_its_name(tmp_path, capsys):
    with pytest.raises(DataError, match="metrics.json: missing"):
        ship(tmp_path, "data", "split.json", out=tmp_path / "weights")
    assert main(["--run", str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err.strip().startswith("error: ")
    assert not (tmp_path / "weights").exists()


def test_the_readme_quotes_the_shipped_weights():
    """The README's model line is edited by hand after `make ship`; it must name the shipped run."""
    from model.ship import WEIGHTS_DIR
    from model.train import SHIPPED_METRICS

    root = Path(__file__).resolve().parents[2]
    metrics = json.loads((root / WEIGHTS_DIR / SHIPPED_METRICS).read_text())
    quoted = re.search(r"validation\s+accuracy \*\*(0\.\d{3})\*\* \(best epoch (\d+) of (?:the first )?(\d+)",
                       (root / "README.md").read_text())
    assert quoted, "README.md: no 'validation accuracy **0.xxx** (best epoch N of [the first] M' line"
    assert float(quoted[1]) == round(metrics["best"]["val_accuracy"], 3)
    assert int(quoted[2]) == metrics["best"]["epoch"]
    assert int(quoted[3]) == len(metrics["history"])
