"""The benchmarks' command lines: a wrong input ends in one line before anything is measured."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("module, argv, message", [
    ("onnx_runtime", ["--onnx", "{tmp}/missing.onnx"], "error: {tmp}/missing.onnx: no such ONNX file"),
    ("onnx_runtime", ["--onnx", "{tmp}/text.onnx"], "error: {tmp}/text.onnx: not an ONNX file ONNX Runtime loads"),
    ("int8_avx2_emulation", ["--int8", "{tmp}/text.onnx"], "error: {tmp}/text.onnx: not an ONNX file (DecodeError)"),
    ("onnx_runtime", ["--onnx", "{onnx}", "--out", "{tmp}/text.onnx/out.json"], "error: {tmp}/text.onnx:"),
    ("precision_accuracy", ["--data", "{tmp}/missing.tar.gz"], "error: {tmp}/missing.tar.gz: no such data set"),
])
def test_a_wrong_input_is_one_line_and_exit_2_before_measuring(module, argv, message, tmp_path, tiny_onnx, capsys):
    import importlib

    (tmp_path / "text.onnx").write_text("not a model")
    main = importlib.import_module(f"benchmarks.{module}").main
    assert main([arg.format(tmp=tmp_path, onnx=tiny_onnx) for arg in argv]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(message.format(tmp=tmp_path))


@pytest.mark.parametrize("module, argv", [
    ("paddle_acmix", ["--rounds", "0"]), ("service_load", ["--concurrency", "8", "0"]),
    ("onnx_runtime", ["--seconds", "-1"]), ("service_ceiling", ["--connections", "0"]),
])
def test_a_number_out_of_range_is_refused_by_argparse(module, argv, capsys):
    import importlib

    with pytest.raises(SystemExit) as exited:
        importlib.import_module(f"benchmarks.{module}").main(argv)
    assert exited.value.code == 2 and "is not a positive" in capsys.readouterr().err


def test_the_load_benchmarks_preflight_names_an_onnx_that_does_not_load(tmp_path, tiny_onnx):
    from benchmarks.service_load import preflight

    (tmp_path / "text.onnx").write_text("not a model")
    assert preflight(tmp_path / "text.onnx").startswith(f"{tmp_path / 'text.onnx'}: not an ONNX file")
    assert preflight(tmp_path / "none.onnx").startswith(f"{tmp_path / 'none.onnx'}: no such ONNX file")
