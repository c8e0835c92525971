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
