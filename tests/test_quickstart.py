"""The README's quick start: its two commands are Makefile targets, and `make serve` works on a
fresh clone (the clone borrows this checkout's virtual environment instead of building its own)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from harness.server import free_port

ROOT = Path(__file__).resolve().parents[1]


def quick_start_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = re.search(r"^## Quick start\n(.*?)(?=^## )", readme, re.S | re.M).group(1)
    block = re.search(r"```(?:sh|bash)?\n(.*?)```", section, re.S).group(1)
    return [line.strip() for line in block.splitlines() if line.strip() and not line.strip().startswith("#")]


def makefile_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))


def test_quick_start_is_make_serve_and_make_test():
    commands = quick_start_commands()
    assert commands == ["make serve", "make test"]
    assert {c.split()[1] for c in commands} <= makefile_targets()


def test_every_make_command_in_the_readme_exists():
    readme = (ROOT / "README.md").read_text()
    used = set(re.findall(r"\bmake ([a-z][\w-]*)", readme))
    assert used and used <= makefile_targets(), used - makefile_targets()


@pytest.mark.slow
def test_make_serve_on_a_fresh_clone_answers_readyz(tmp_path):
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    if not (clone / "model/weights/alexnet_acmix.pdparams").is_file():
        pytest.skip("no shipped weights are committed yet")
    (clone / ".venv").symlink_to(ROOT / ".venv")  # setup is then a no-op: its stamp is newer than the lock
    port = free_port()
    env = {**os.environ, "ACMIX_PORT": str(port), "ACMIX_GRPC_PORT": str(free_port()), "ACMIX_BACKEND": "onnxruntime"}
    process = subprocess.Popen(["make", "serve"], cwd=clone, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and process.poll() is None:
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1)
                if response.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        assert process.poll() is None, process.stdout.read()
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz").json()
        assert ready["ready"] and ready["backend"] == "onnxruntime"
        assert (clone / "build/alexnet_acmix.onnx").is_file()  # exported from the shipped weights
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


def test_every_setting_is_documented():
    from service.settings import Settings

    readme = (ROOT / "README.md").read_text()
    missing = [name for name in Settings.model_fields if f"`ACMIX_{name.upper()}`" not in readme]
    assert missing == []
