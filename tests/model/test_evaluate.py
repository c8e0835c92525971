"""python -m model.evaluate end to end on a small folder data set, and its errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from model.data import open_dataset
from model.evaluate import confusion_matrix, main, summarize


@pytest.fixture
def weights(paddle, tmp_path):
    from model.alexnet import AlexNet_ACmix

    paddle.seed(0)
    path = tmp_path / "w.pdparams"
    paddle.save(AlexNet_ACmix().state_dict(), str(path))
    return path


def test_json_last_line_agrees_with_the_model(paddle, weights, folder_dataset, tmp_path, capsys):
    from model.predict import load_weights, predict_logits

    root, labels = folder_dataset
    png = tmp_path / "cm.png"
    assert main(["--weights", str(weights), "--data", str(root), "--json", "--confusion", str(png)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    data = open_dataset(root)
    predictions = predict_logits(load_weights("alexnet_acmix", str(weights)), data.images).argmax(1)
    assert result["n"] == len(labels) == 30
    assert result["accuracy"] == pytest.approx(float((predictions == data.labels).mean()))
    assert np.array(result["confusion_matrix"]).sum() == 30
    assert set(result["per_class"]) == {"airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                        "ship", "truck"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_counts_per_class():
    labels = np.array([0, 0, 1, 1, 2])
    predictions = np.array([0, 1, 1, 1, 0])
    matrix = confusion_matrix(labels, predictions)
    assert matrix[0].tolist()[:3] == [1, 1, 0] and matrix[2, 0] == 1
    summary = summarize(labels, predictions)
    assert summary["accuracy"] == pytest.approx(0.6)
    assert summary["per_class"]["airplane"] == 0.5 and summary["per_class"]["automobile"] == 1.0
    assert summary["per_class"]["cat"] is None


def test_the_confusion_matrix_goes_where_asked_even_without_a_suffix(paddle, weights, folder_dataset, tmp_path,
                                                                     capsys):
    root, _ = folder_dataset
    assert main(["--weights", str(weights), "--data", str(root), "--confusion", str(tmp_path / "cm")]) == 0
    assert (tmp_path / "cm").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not (tmp_path / "cm.png").exists()
    assert f"confusion matrix: {tmp_path / 'cm'}" in capsys.readouterr().out


def test_by_default_the_training_images_the_split_was_drawn_from_give_their_held_out_ones_wherever_they_are(
        paddle, weights, folder_dataset, tmp_path, capsys):
    """The shared archive was known by its path relative to the clone: from a clone elsewhere,
    evaluate scored on all 50,000 images, training ones included, without a word. Now the data set
    decides: one holding every image the split file lists gets its held-out images, another all."""
    root, _ = folder_dataset
    sources = open_dataset(root).sources
    split = tmp_path / "val_split.json"
    split.write_text(json.dumps({"val": sources[::3]}))
    common = ["--weights", str(weights), "--split-file", str(split), "--confusion", str(tmp_path / "cm.png"), "--json"]
    assert main([*common, "--data", str(root)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["n"], result["split"]) == (len(sources[::3]), "val")
    split.write_text(json.dumps({"val": [*sources[::3], "train/cat/9999.png"]}))  # not all of them here
    assert main([*common, "--data", str(root)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["n"], result["split"]) == (len(sources), "all")


@pytest.mark.parametrize("case", ["missing-weights", "bad-weights", "wrong-arch", "missing-data", "folder-out"])
def test_errors_exit_2_with_one_line(paddle, weights, folder_dataset, tmp_path, capsys, case):
    root, _ = folder_dataset
    args = {"--weights": str(weights), "--data": str(root), "--confusion": str(tmp_path / "cm.png")}
    expected = None
    if case == "missing-weights":
        args["--weights"] = str(tmp_path / "none.pdparams")
        expected = "none.pdparams: no such weights file"
    elif case == "bad-weights":
        bad = tmp_path / "bad.pdparams"
        bad.write_bytes(b"not a checkpoint")
        args["--weights"] = str(bad)
        expected = "bad.pdparams: not a Paddle .pdparams file"
    elif case == "wrong-arch":
        args["--arch"] = "alexnet"
        expected = "not alexnet weights"
    elif case == "missing-data":
        args["--data"] = str(tmp_path / "nowhere")
        expected = "nowhere: no such file or directory"
    else:  # named before the evaluation (it wrote <folder>.png after it, and said it wrote the folder)
        args["--confusion"] = str(tmp_path)
        expected = f"{tmp_path}: a folder, not a file"
    assert main([item for pair in args.items() for item in pair]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0]
