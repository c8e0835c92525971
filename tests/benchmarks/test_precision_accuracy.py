"""python -m benchmarks.precision_accuracy: each served precision's top-1 against the labels and against fp32."""

from __future__ import annotations

import json
import shutil

import numpy as np

from benchmarks.precision_accuracy import main, precision_rows


def one_hot_logits(predictions: list[int], classes: int = 10) -> np.ndarray:
    return np.eye(classes, dtype=np.float32)[predictions]


def test_the_rows_count_each_precisions_hits_and_its_agreement_with_fp32():
    labels = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    fp32 = [0, 1, 2, 3, 4, 5, 6, 7, 0, 0]  # 8 of 10 right
    int8 = [0, 1, 2, 3, 4, 5, 6, 0, 0, 9]  # 8 right, 2 answers differ from fp32's
    rows = {row["precision"]: row for row in precision_rows({"fp32": one_hot_logits(fp32),
                                                             "int8": one_hot_logits(int8)}, labels)}
    assert rows["fp32"]["accuracy"] == 0.8 and rows["fp32"]["top1_agreement_with_fp32"] == 1.0
    assert rows["int8"]["accuracy"] == 0.8 and rows["int8"]["points_from_fp32"] == 0.0
    assert rows["int8"]["top1_agreement_with_fp32"] == 0.8
    worse = precision_rows({"fp32": one_hot_logits(fp32), "int8": one_hot_logits([1] * 10)}, labels)[1]
    assert worse["accuracy"] == 0.1 and round(worse["points_from_fp32"], 6) == -70.0


def test_it_runs_the_fp32_and_int8_files_on_every_image_and_records_the_cpu(weights, onnx_model, folder_dataset,
                                                                            tmp_path, capsys):
    """The real exported model and its int8 file (calibrated here on the same synthetic images)."""
    from export.int8 import quantize_int8
    from runtime.artifacts import derived_onnx_path
    from runtime.reference import reference_path

    data, labels = folder_dataset
    onnx = shutil.copy(onnx_model, tmp_path / "alexnet_acmix.onnx")
    shutil.copy(reference_path(onnx_model), reference_path(onnx))  # as the export leaves it
    quantize_int8(onnx, derived_onnx_path(onnx, "int8"), data=data, split_file=None, count=16,
                  table_path=tmp_path / "table.json")
    out = tmp_path / "accuracy.json"
    code = main(["--onnx", str(onnx), "--weights", str(weights), "--data", str(data), "--jpeg-data", "",
                 "--split-file", "", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    assert result["cpu"]["model"] and [row["precision"] for row in result["rows"]] == ["fp32", "int8"]
    for row in result["rows"]:
        assert row["n"] == len(labels) and row["copy"] == "lossless"
        assert round(row["accuracy"] * len(labels)) == row["accuracy"] * len(labels)  # a count of hits
    assert result["rows"][0]["top1_agreement_with_fp32"] == 1.0
    assert "CPU: " in capsys.readouterr().out


def test_an_onnx_exported_from_other_weights_is_refused_in_one_line(onnx_model, folder_dataset, tmp_path, capsys):
    from model import paths

    data, _ = folder_dataset
    code = main(["--onnx", str(onnx_model), "--weights", paths.WEIGHTS, "--data", str(data)])
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and len(err) == 1
    assert err[0] == (f"error: {onnx_model} was made from another weights file than {paths.WEIGHTS}; "
                      f"export it first: python -m export onnx")
