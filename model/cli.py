"""What every command line of the project shares: argument types that refuse an out-of-range number
by the flag's name (argparse then exits 2 with one line), and the one line a command ends with
when its input is wrong: `error: <cause>` on stderr, exit status 2, never a traceback.

Training, evaluation, shipping, export and the benchmarks use them; model/ is the bottom layer,
so each of them can.
"""

from __future__ import annotations

import argparse
import functools
import math
import signal
import sys


def _number(kind, text: str, lowest, inclusive: bool, what: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    # nan passes no comparison and inf every one: neither is a length of time, a count or a rate.
    if (kind is float and not math.isfinite(value)) or value < lowest or (value == lowest and not inclusive):
        raise argparse.ArgumentTypeError(f"{text} is not {what}")
    return value


def positive_int(text: str) -> int:
    return _number(int, text, 1, True, "a positive integer")


def positive_float(text: str) -> float:
    return _number(float, text, 0.0, False, "a positive number")


def non_negative_float(text: str) -> float:
    return _number(float, text, 0.0, True, "a non-negative number")


def probability(text: str) -> float:
    """A number in [0, 1)."""
    value = non_negative_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"{text} is not below 1")
    return value


def cause(exc: BaseException) -> str:
    """The one line that names what went wrong: a file error names its file, anything else says
    its message (its type where it has none)."""
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or exc}"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def fail(exc: BaseException) -> int:
    """Print `error: <cause>` to stderr; the exit status of a command whose input was wrong."""
    print(f"error: {cause(exc)}", file=sys.stderr)
    return 2


def one_line_errors(*errors: type[BaseException]):
    """For a command's main(argv): ValueError, OSError and `errors` end it with `error: <cause>`
    and exit status 2 (the input was wrong), never a traceback."""
    def wrap(main):
        @functools.wraps(main)
        def run(argv=None) -> int:
            try:
                return main(argv)
            except (ValueError, OSError, *errors) as exc:
                return fail(exc)
        return run
    return wrap


def command(main, argv=None) -> int:
    """Run a command's main(argv) as `python -m ...` does: Ctrl-C ends it with one line, `error:
    interrupted`, and exit status 130 (128 + SIGINT), never a KeyboardInterrupt traceback. What the
    command was writing is staged (model/files.py) and removed on the way out, so the file before it
    stays as it was.

    SIGINT is caught here rather than by KeyboardInterrupt alone: raised inside a C extension's
    callback (Paddle's), a KeyboardInterrupt can come out as another exception (a SystemError)."""
    interrupted = []

    def on_interrupt(signum, frame):
        interrupted.append(signum)
        raise KeyboardInterrupt

    previous = signal.getsignal(signal.SIGINT)
    # A command started in the background of a shell ignores SIGINT: it keeps ignoring it.
    if previous is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, on_interrupt)
    try:
        return main(argv)
    except BaseException as exc:
        if not (interrupted or isinstance(exc, KeyboardInterrupt)) or isinstance(exc, SystemExit):
            raise
        print("\nerror: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        signal.signal(signal.SIGINT, previous)
