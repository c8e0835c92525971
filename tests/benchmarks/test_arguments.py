"""The benchmarks' command lines: a wrong input ends in one line before anything is measured."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("module, argv, message", [
    ("onnx_runtime", ["--onnx", "{tmp}/missing.onnx"], "error: {tmp}/missing.onnx: no such ONNX file"),
    ("onnx_runtime", ["--onnx", "{tmp}/text.onnx"], "error: {tmp}/text.onnx: not an ONNX file ONNX Runtime loads"),
    ("int8_avx2_emulation", ["--int8", "{tmp}/text.onnx"], "error: {tmp}/text.onnx: not an ONNX file (DecodeError)"),
    ("onnx_runtime", ["--onnx", "{onnx}", "--out", "{tmp}/text.onnx/out.json"],
     "error: {tmp}/text.onnx/out.json: cannot write here ({tmp}/text.onnx is a file, not a folder)"),
    ("precision_accuracy", ["--data", "{tmp}/missing.tar.gz"], "error: {tmp}/missing.tar.gz: no such data set"),
    ("ratio_spread", ["--onnx", "{tmp}/missing.onnx"], "error: {tmp}/missing.onnx: no such ONNX file"),
    # an output that cannot be written, named before the runs (they measured first, then failed to write)
    ("ratio_spread", ["--onnx", "{onnx}", "--out", "{tmp}"], "error: {tmp}: a folder, not a file"),
    ("onnx_runtime", ["--onnx", "{onnx}", "--out", "{tmp}"], "error: {tmp}: a folder, not a file"),
    ("service_load", ["--onnx", "{onnx}", "--out", "/proc/acmix/out.json"],
     "error: /proc/acmix/out.json: cannot write here (No such file or directory)"),
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
    ("onnx_runtime", ["--seconds", "-1"]), ("onnx_runtime", ["--threads", "0"]),
    ("service_ceiling", ["--connections", "0"]), ("ratio_spread", ["--runs", "0"]),
])
def test_a_number_out_of_range_is_refused_by_argparse(module, argv, capsys):
    import importlib

    with pytest.raises(SystemExit) as exited:
        importlib.import_module(f"benchmarks.{module}").main(argv)
    assert exited.value.code == 2 and "is not a positive" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["service_load", "service_ceiling", "ray_vs_fastapi"])
def test_the_load_benchmarks_name_an_onnx_that_does_not_load_in_one_line(tmp_path, capsys, module):
    import importlib

    main = importlib.import_module(f"benchmarks.{module}").main
    (tmp_path / "text.onnx").write_text("not a model")
    for name, cause in (("text.onnx", "not an ONNX file"), ("none.onnx", "no such ONNX file")):
        out = tmp_path / "results.json"
        assert main(["--onnx", str(tmp_path / name), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {tmp_path / name}: {cause}") and err.count("\n") == 1
        assert not out.exists()


def test_make_bench_names_an_onnx_that_does_not_load_before_the_first_benchmark(tmp_path, capsys, monkeypatch):
    """It ran the Paddle benchmark (minutes) first, and only then found the file to serve unusable."""
    import benchmarks.__main__ as bench
    from benchmarks import paddle_acmix

    def measured(argv):
        raise AssertionError("a benchmark ran before --onnx was checked")

    monkeypatch.setattr(paddle_acmix, "main", measured)
    (tmp_path / "text.onnx").write_text("not a model")
    assert bench.main(["--onnx", str(tmp_path / "text.onnx")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'text.onnx'}: not an ONNX file")
    # only the TensorRT benchmark left, which builds engines from --onnx: checked first too
    skip = ["--skip", "paddle", "onnx_runtime", "accuracy", "service", "ray", "ceiling"]
    assert bench.main(["--onnx", str(tmp_path / "text.onnx"), *skip]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'text.onnx'}: not an ONNX file")
