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

    import numpy as np
    import paddle

    shipped, best = paddle.load(str(out / "alexnet_acmix.pdparams")), paddle.load(str(run / "best.pdparams"))
    assert shipped.keys() == best.keys()
    assert all(np.array_equal(shipped[k].numpy(), best[k].numpy()) for k in best)  # no subnormals to flush here
    assert json.loads((out / "training_metrics.json").read_text())["best"]["epoch"] == 2
    for png in ("learning_curves.png", "confusion_matrix.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (out / "README.md").read_text()
    assert f"**{evaluation['accuracy']:.4f}**" in card
    assert "| epochs trained / planned | 2 / 50 (best: epoch 2) |" in card
    assert "the best weights (epoch 2) of the first 2 epochs of a run of 50 epochs" in card
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
    assert ("**Work in progress:** the best weights (epoch 2) of the first 2 epochs of a run of 8 epochs started "
            "from the best weights (epoch 50, validation accuracy 0.8000) of a run of 50 epochs") in card
    assert "| epochs trained / planned | 50 / 50 + 2 / 8 (best: epoch 2 of the second run) |" in card
    assert "python -m model.train\n" in card  # the first run: the defaults
    assert (f"python -m model.train --out {run} --epochs 8 --lr 0.0001 --crop-scale-min 0.8 --rotation 0 --jitter 0.1 "
            "--init-weights runs/alexnet_acmix/best.pdparams\n") in card
    assert "random resized crop 128 (scale 0.6–1), horizontal flip, rotation ±20°" in card
    assert "lr 0.0001 with cosine decay per step over the 8 epochs" in card
    assert "random resized crop 128 (scale 0.8–1), horizontal flip, no rotation" in card
    assert "| 50 | 1.00e-03 |" in card.split("Epochs of the second run")[0]
    assert "| 2 | 1.00e-03 | 1.8000 | 0.3000 | 1.7000 | 0.8200 |" in card.split("Epochs of the second run")[1]


def test_the_card_has_the_jpeg_figures_the_calibration_and_the_recipe_search_of_the_records(run, folder_dataset,
                                                                                           tmp_path):
    from model.calibration import read_temperature

    root, labels = folder_dataset
    jpeg_root = tmp_path / "jpeg"
    import shutil

    from PIL import Image

    shutil.copytree(root, jpeg_root)
    for png in jpeg_root.rglob("*.png"):  # the JPEG q75 copy, under the same names
        Image.open(png).convert("RGB").save(png.with_suffix(".jpg"), quality=75)
        png.unlink()
    proxy = tmp_path / "proxy" / "adamw_translate"
    proxy.mkdir(parents=True)
    record = json.loads((run / "metrics.json").read_text())
    record["config"].update(optimizer="adamw", weight_decay=0.05, warmup_epochs=0.5, augment="translate", jpeg=0.5,
                            epochs=2)
    (proxy / "metrics.json").write_text(json.dumps(record))

    out = tmp_path / "weights"
    evaluation = ship(run, str(root), "unused.json", out=out, split="all", jpeg_data=str(jpeg_root), proxies=[proxy])
    card = (out / "README.md").read_text()
    jpeg, calibration = evaluation["jpeg"], evaluation["calibration"]
    assert jpeg["n"] == len(labels) and f"| {jpeg['accuracy']:.4f} (" in card
    assert read_temperature(out) == pytest.approx(calibration["temperature"])
    assert f"**T = {calibration['temperature']:.4f}**" in card and f"**{calibration['ece_after']:.4f}**" in card
    assert (out / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    (row,) = json.loads((out / "recipe_search.json").read_text())
    assert row["name"] == "adamw_translate" and row["epochs"] == 2 and row["val_accuracy_by_epoch"] == [0.31, 0.42]
    assert "| `adamw_translate` | AdamW (decoupled weight decay), lr 0.001 with 0.5 epochs of linear warmup" in card
    assert "random translation by up to 4 pixels" in card and "| 0.3100, 0.4200 | **0.4200** | 22 |" in card
    # Shipped again without --proxies: the recorded search stays in the card.
    ship(run, str(root), "unused.json", out=out, split="all")
    assert "| `adamw_translate` |" in (out / "README.md").read_text()


def test_a_folder_that_is_no_run_is_refused_with_its_name(tmp_path, capsys):
    with pytest.raises(DataError, match="metrics.json: missing"):
        ship(tmp_path, "data", "split.json", out=tmp_path / "weights")
    assert main(["--run", str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err.strip().startswith("error: ")
    assert not (tmp_path / "weights").exists()


@pytest.mark.parametrize("spoil, message", [
    ("weights", "best.pdparams: not alexnet_acmix weights"),
    ("record", "metrics.json: not a run record"),
    ("data", "no such data set"),
    ("proxies", "nowhere/metrics.json: not a run record"),
])
def test_a_bad_input_is_refused_before_the_shipped_weights_are_touched(run, folder_dataset, tmp_path, spoil, message,
                                                                      paddle):
    from model.alexnet import AlexNet

    root, _ = folder_dataset
    out = tmp_path / "weights"
    out.mkdir()
    (out / "alexnet_acmix.pdparams").write_bytes(b"the weights shipped before")
    data, proxies = str(root), None
    if spoil == "weights":
        paddle.save(AlexNet().state_dict(), str(run / "best.pdparams"))
    elif spoil == "record":
        (run / "metrics.json").write_text("{}")
    elif spoil == "data":
        data = str(tmp_path / "absent.tar.gz")
    else:
        proxies = [tmp_path / "nowhere"]
    with pytest.raises((DataError, ValueError), match=message):
        ship(run, data, "unused.json", out=out, split="all", proxies=proxies)
    assert sorted(p.name for p in out.iterdir()) == ["alexnet_acmix.pdparams"]
    assert (out / "alexnet_acmix.pdparams").read_bytes() == b"the weights shipped before"


def test_a_failure_while_the_files_are_made_leaves_the_weights_and_card_shipped_before(run, folder_dataset, tmp_path,
                                                                                     monkeypatch):
    """The card is the last file made; failing there, nothing of the new shipment is in place."""
    from model import ship as ship_module

    root, _ = folder_dataset
    out = tmp_path / "weights"
    out.mkdir()
    before = {"alexnet_acmix.pdparams": b"the weights shipped before", "README.md": b"their card"}
    for name, data in before.items():
        (out / name).write_bytes(data)

    def card_fails(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ship_module, "model_card", card_fails)
    with pytest.raises(OSError, match="disk full"):
        ship(run, str(root), "unused.json", out=out, split="all")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # and no staging folder left
    (out / ".ship.killed").mkdir()  # what a ship killed mid-way leaves: the next one removes it
    (out / ".ship.killed" / "alexnet_acmix.pdparams").write_bytes(b"half")
    monkeypatch.undo()
    ship(run, str(root), "unused.json", out=out, split="all")
    assert not list(out.glob(".ship.*")) and (out / "alexnet_acmix.pdparams").read_bytes() != before["alexnet_acmix.pdparams"]


def test_the_readme_quotes_the_shipped_weights():
    """The README's model line is edited by hand after `make ship`; it must name the shipped run."""
    from model.ship import WEIGHTS_DIR
    from model.train import SHIPPED_METRICS

    root = Path(__file__).resolve().parents[2]
    metrics = json.loads((root / WEIGHTS_DIR / SHIPPED_METRICS).read_text())
    readme = (root / "README.md").read_text()
    if "average" in metrics:  # python -m model.average: epoch P of the parent's N and epoch E of the restart's M
        quoted = re.search(r"validation\s+accuracy \*\*(0\.\d{3})\*\* \(the\s+average\s+of\s+epoch\s+(\d+)\s+of\s+(\d+)"
                           r"\s.*?\sand\s+epoch\s+(\d+)\s+of\s+(\d+)\s", readme, re.S)
        assert quoted, "README.md: no 'validation accuracy **0.xxx** (the average of epoch P of N ... and epoch E of M' line"
        parent, restart = metrics["average"]["sources"]
        assert [int(n) for n in quoted.groups()[1:]] == [
            parent["epoch"], len(metrics["parent"]["history"]), restart["epoch"], len(metrics["history"])]
    else:
        quoted = re.search(r"validation\s+accuracy \*\*(0\.\d{3})\*\* \(best epoch (\d+) of (?:the first )?(\d+)", readme)
        assert quoted, "README.md: no 'validation accuracy **0.xxx** (best epoch N of [the first] M' line"
        assert int(quoted[2]) == metrics["best"]["epoch"]
        assert int(quoted[3]) == len(metrics["history"])
    assert float(quoted[1]) == round(metrics["best"]["val_accuracy"], 3)


def test_a_proxy_row_without_minutes_says_so():
    from model.ship import proxy_table

    row = {"name": "reference", "recipe": "Adam", "epochs": 4, "val_accuracy": 0.51, "val_accuracy_by_epoch": [0.4, 0.51],
           "minutes": None}
    assert "| 0.4000, 0.5100 | **0.5100** | not recorded |" in proxy_table([row])


def test_the_card_of_a_third_run_names_every_stage_and_where_each_started(run, folder_dataset, tmp_path):
    root, _ = folder_dataset
    first = json.loads((run / "metrics.json").read_text())
    first["history"] = [history_entry(epoch, 0.3 + epoch / 100) for epoch in range(1, 13)]
    first["best"] = {"epoch": 11, "val_accuracy": 0.41}
    second = {"config": {**first["config"], "epochs": 3, "lr": 3e-4, "init_weights": "model/weights/alexnet_acmix.pdparams"},
              "history": [history_entry(e, 0.5 + e / 100) for e in (1, 2, 3)],
              "best": {"epoch": 3, "val_accuracy": 0.53}, "parent": first}
    third = {"config": {**first["config"], "epochs": 4, "lr": 2e-4, "ema": 0.999,
                        "init_weights": "model/weights/alexnet_acmix.pdparams"},
             "history": [{**history_entry(e, 0.6 + e / 100), "raw_val_accuracy": 0.55 + e / 100} for e in (1, 2)],
             "best": {"epoch": 2, "val_accuracy": 0.62}, "parent": second}
    (run / "metrics.json").write_text(json.dumps(third))

    ship(run, str(root), "unused.json", out=tmp_path / "weights", split="all")
    card = (tmp_path / "weights" / "README.md").read_text()
    assert "| epochs trained / planned | 12 / 50 + 3 / 3 + 2 / 4 (best: epoch 2 of the third run) |" in card
    for name in ("the first run", "the second run", "the third run"):
        assert f"* Recipe of {name}:" in card and f"Epochs of {name}:" in card
    assert "exponential moving average of the weights (decay 0.999 per step)" in card
    # The third run's table shows the average's accuracy and the trained weights' beside it.
    assert "| val acc (weight average) | val acc (trained weights) |" in card
    assert "| 2 | 1.00e-03 | 1.8000 | 0.3000 | 1.7000 | 0.6200 | 0.5700 | 11.0 |" in card
    # The first two runs' weights were shipped (where the next run started): each is trained in a folder
    # of its own, then shipped; the card never trains into the shipped weights' folder.
    assert "--out model/weights" not in card
    for number in (1, 2):
        assert f"--out runs/alexnet_acmix_run{number}" in card
        assert f"python -m model.ship --run runs/alexnet_acmix_run{number}\npython -m model.train --out " in card
    assert card.count("\npython -m model.ship --run ") == 3


def test_the_recipe_text_lists_the_jpeg_reencoding_first_as_the_augmentation_applies_it():
    """JPEG re-encoding runs on the source image, before translation (or the reference's resize)."""
    from model.ship import augmentation_text

    translate = {"augment": "translate", "jpeg": 0.9, "erasing": 0.1, "pad": 4}
    assert augmentation_text(translate) == (
        "at 32×32: JPEG re-encoding (quality 40–95) of 90% of the images, random translation by up to 4 pixels "
        "(reflect padding), horizontal flip, random erasing (10%); then the bilinear resize to 128 that inference uses")
    reference = {"augment": "reference", "jpeg": 0.0, "jitter": 0.2, "crop_scale_min": 0.6, "rotation": 20.0}
    assert augmentation_text(reference).startswith("resize 130, color jitter 0.2")
    # CutMix mixes the batch where the augmentation ends: at 32×32 before the resize, or at 128
    assert augmentation_text({**translate, "cutmix": 0.5}).endswith(
        "random erasing (10%), CutMix of 50% of the batches; then the bilinear resize to 128 that inference uses")
    assert augmentation_text({**reference, "cutmix": 1.0}).endswith("rotation ±20°, CutMix of 100% of the batches")


def test_the_recipe_text_says_when_a_run_trained_on_part_of_the_split():
    from dataclasses import asdict

    from model.ship import recipe_text
    from model.train import TrainConfig

    assert recipe_text(asdict(TrainConfig(train_per_class=1000))).endswith(
        "; trained on 1,000 images of each class of the training split")
    assert "trained on" not in recipe_text(asdict(TrainConfig()))
