"""Run a command as if this x86-64 CPU lacked AVX-512 (or only VNNI): the code paths of CPUs the
project has no machine of, measured and tested on the one it has.

    python -m harness.hidden_cpu_features avx2 python -m benchmarks.onnx_runtime --out build/bench/avx2.json
    python -m harness.hidden_cpu_features avx512 python -m benchmarks.int8_avx2_emulation

("python" runs as this Python, so the virtual environment's.)
avx2 hides every AVX-512 part, AVX-VNNI and AMX (an AVX2-only CPU: AMD Zen 2/3, Intel before Ice
Lake); avx512 hides only the VNNI parts (AVX-512 without VNNI: Intel Skylake-SP). The command runs
with harness/hidden_cpu_features.c preloaded (compiled here into build/ with the system's C
compiler): its CPUID instructions answer without the hidden features, so ONNX Runtime's MLAS and
NumPy choose the kernels they would there, and /proc/cpuinfo's flags, which runtime/cpu.py reads,
leave them out too (runtime.cpu.describe then names the hidden profile). That needs Linux's CPUID
faulting ("cpuid_fault" among the flags); a CPU without the hidden features gains nothing.

The figures are those code paths on this machine's cores, caches and clock: a measurement of which
kernels run and what they compute, not of another CPU's speed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from model.runtime import read_cpuinfo
from runtime.cpu import HIDDEN_ENV  # the library reads it too

SOURCE = Path(__file__).with_suffix(".c")
BUILD = Path(__file__).resolve().parents[1] / "build"
PROFILES = ("avx2", "avx512")


class HiddenFeaturesError(RuntimeError):
    """This machine cannot hide CPU features (the message says why)."""


def unavailable(cpuinfo_path: str = "/proc/cpuinfo") -> str | None:
    """Why features cannot be hidden here, or None when they can."""
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return f"needs Linux on x86-64, not {platform.system()} on {platform.machine()}"
    flags = read_cpuinfo(cpuinfo_path).get("flags")
    if flags is None:
        return f"cannot read the flags of {cpuinfo_path}"
    if "cpuid_fault" not in flags.split():
        return "this CPU or its hypervisor cannot make CPUID fault (no cpuid_fault in /proc/cpuinfo)"
    if not compiler():
        return "no C compiler (cc or gcc) to build harness/hidden_cpu_features.c"
    return None


def compiler() -> str | None:
    return shutil.which("cc") or shutil.which("gcc")


def library(build: Path = BUILD) -> Path:
    """The compiled library, built once per version of its source."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    path = build / f"hidden_cpu_features.{digest}.so"
    if not path.exists():
        if why := unavailable():
            raise HiddenFeaturesError(why)
        build.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        done = subprocess.run([compiler(), "-O2", "-shared", "-fPIC", "-o", str(partial), str(SOURCE), "-ldl"],
                              capture_output=True, text=True)
        if done.returncode:
            raise HiddenFeaturesError(f"cannot compile {SOURCE.name}: {done.stderr.strip().splitlines()[-1:]}")
        partial.replace(path)
    return path


def environment(profile: str, base: dict | None = None) -> dict:
    """A copy of `base` (default os.environ) in which a child process runs with `profile` hidden."""
    if profile not in PROFILES:
        raise HiddenFeaturesError(f"unknown profile {profile!r}: one of {', '.join(PROFILES)}")
    env = dict(os.environ if base is None else base)
    preload = [str(library())] + [p for p in env.get("LD_PRELOAD", "").split(":") if p]
    env.update(LD_PRELOAD=":".join(preload), **{HIDDEN_ENV: profile})
    return env


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.hidden_cpu_features", description=__doc__.split("\n\n")[0])
    parser.add_argument("profile", choices=PROFILES, help="avx2: no AVX-512, AVX-VNNI, AMX; avx512: no VNNI")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command and its arguments")
    args = parser.parse_args(argv)
    if not args.command:
        parser.error("give the command to run")
    try:
        env = environment(args.profile)
    except HiddenFeaturesError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    command = [sys.executable if args.command[0] in ("python", "python3") else args.command[0], *args.command[1:]]
    try:
        os.execvpe(command[0], command, env)
    except OSError as exc:  # no such program, not executable: one line, not a traceback
        print(f"error: {command[0]}: {exc.strerror or exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
