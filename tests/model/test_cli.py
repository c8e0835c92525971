"""model/cli.py: what every command line shares, so that a wrong input ends in one line, exit 2."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from model.cli import cause, one_line_errors, positive_float, positive_int, probability
from model.files import replacing


@pytest.mark.parametrize("kind, text, message", [
    (positive_int, "0", "0 is not a positive integer"),
    (positive_int, "-3", "-3 is not a positive integer"),
    (positive_int, "2.5", "'2.5' is not an integer"),
    (positive_float, "0", "0 is not a positive number"),
    (positive_float, "many", "'many' is not a number"),
    (probability, "1", "1 is not below 1"),
    (probability, "-0.1", "-0.1 is not a non-negative number"),
    # inf passed "positive" (a benchmark of --seconds inf never ended) and nan every range test
    (positive_float, "inf", "inf is not a positive number"),
    (positive_float, "nan", "nan is not a positive number"),
    (probability, "nan", "nan is not a non-negative number"),
])
def test_argument_types_refuse_out_of_range_numbers_by_value(kind, text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=f"^{message}$".replace("(", r"\(").replace(")", r"\)")):
        kind(text)


def test_argument_types_take_what_is_in_range():
    assert positive_int("1" + "0" * 400) == 10**400  # an integer is finite (math.isfinite overflowed on it)
    assert positive_int("3") == 3 and positive_float("0.5") == 0.5 and probability("0") == 0.0


def test_a_command_ends_in_one_line_naming_the_file_for_the_errors_it_expects(capsys, tmp_path):
    class Refused(Exception):
        pass

    @one_line_errors(Refused)
    def main(argv=None):
        if argv == ["file"]:
            open(tmp_path / "absent.json")
        if argv == ["refused"]:
            raise Refused("the input is wrong\nand a second line")
        if argv == ["bug"]:
            raise KeyError("a bug is not the input's fault")
        return 0

    assert main(["file"]) == 2 and capsys.readouterr().err == f"error: {tmp_path / 'absent.json'}: No such file or directory\n"
    assert main(["refused"]) == 2 and capsys.readouterr().err == "error: the input is wrong\n"
    assert main([]) == 0
    with pytest.raises(KeyError):  # a bug keeps its traceback
        main(["bug"])


def test_writing_where_one_cannot_names_the_file_asked_for_not_a_temporary_one(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(OSError) as caught:
        with replacing(tmp_path / "a_file" / "out.onnx"):
            pass
    assert cause(caught.value).startswith(f"{tmp_path / 'a_file' / 'out.onnx'}: cannot write here")
    with pytest.raises(IsADirectoryError) as caught:
        with replacing(tmp_path):
            pass
    assert cause(caught.value) == f"{tmp_path}: a folder, not a file"


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_a_folder_where_no_file_can_be_made_is_refused_before_the_long_step_even_for_root(tmp_path):
    """os.access said yes to root for /proc: evaluate --confusion /proc/c.png ran 105 s, then failed."""
    from model.files import writable

    with pytest.raises(OSError) as caught:
        writable("/proc/c.png")
    assert cause(caught.value).startswith("/proc/c.png: cannot write here (")
    assert writable(tmp_path / "new" / "out.json") == tmp_path / "new" / "out.json"
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == []  # the probe is gone


def test_ctrl_c_ends_a_command_in_one_line_and_status_130_not_a_traceback(capsys):
    import os
    import signal

    from model.cli import command

    def interrupted(argv):
        raise KeyboardInterrupt

    assert command(interrupted) == 130
    assert capsys.readouterr().err.strip().splitlines() == ["error: interrupted"]

    def converted(argv):  # Paddle's C code turned the KeyboardInterrupt raised in its callback into another error
        try:
            os.kill(os.getpid(), signal.SIGINT)
        except KeyboardInterrupt:
            raise SystemError("<class 'UnicodeDecodeError'> returned a result with an exception set") from None

    previous = signal.getsignal(signal.SIGINT)
    assert command(converted) == 130
    assert capsys.readouterr().err.strip().splitlines() == ["error: interrupted"]
    assert signal.getsignal(signal.SIGINT) is previous  # put back for whoever called it in-process

    def wrong(argv):  # any other error is not taken for an interruption
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError):
        command(wrong)


def test_ctrl_c_in_a_real_process(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    program = ("import sys, time; from model.cli import command\n"
               "def main(argv):\n    print('ready', flush=True)\n    time.sleep(60)\n"
               "sys.exit(command(main))\n")
    root = Path(__file__).resolve().parents[2]
    with subprocess.Popen([sys.executable, "-c", program], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)) as process:
        assert process.stdout.readline() == "ready\n"
        started = time.monotonic()
        process.send_signal(signal.SIGINT)
        err = process.stderr.read()
    assert process.returncode == 130 and time.monotonic() - started < 10
    assert err.strip().splitlines() == ["error: interrupted"]


@pytest.mark.parametrize("module", ["export/__main__.py", "model/train.py", "model/evaluate.py", "model/ship.py",
                                    "model/average.py", "benchmarks/__main__.py",
                                    *(str(p.relative_to(Path(__file__).resolve().parents[2]))
                                      for p in sorted((Path(__file__).resolve().parents[2] / "benchmarks").glob("*.py"))
                                      if 'if __name__ == "__main__":' in p.read_text())])
def test_every_command_line_runs_its_main_through_command(module):
    """python -m <module>: Ctrl-C is one line and status 130 there too (model.cli.command)."""
    text = (Path(__file__).resolve().parents[2] / module).read_text()
    block = text.split('if __name__ == "__main__":', 1)[1]
    assert "command(main)" in block
