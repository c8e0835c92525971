"""Start `python -m service` as a child process on loopback and wait until it is ready.

For the tests and benchmarks that need a real server; settings go in as ACMIX_* variables.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(onnx_path, timeout: float = 90, **settings) -> tuple[subprocess.Popen, str]:
    """(process, base URL) of a ready server on ONNX Runtime; settings: e.g. max_batch_size=32,
    grpc_port=free_port() (gRPC is off unless given), workers=2 (one process unless given)."""
    port = free_port()
    # No weights: the given ONNX is used as it is, never exported again over.
    env = {**os.environ, "ACMIX_BACKEND": "onnxruntime", "ACMIX_ONNX_PATH": str(onnx_path),
           "ACMIX_WEIGHTS_PATH": "unused.pdparams", "ACMIX_LOG_LEVEL": "warning", "ACMIX_GRPC_PORT": "0",
           "ACMIX_WORKERS": "1"}
    env.update({f"ACMIX_{name.upper()}": str(value) for name, value in settings.items()})
    # Its output goes to a file, read by output(): a pipe that nobody reads while the server runs
    # fills (64 KiB: a few hundred log lines) and blocks it. Appending, so that reading never moves
    # where the server writes.
    log = tempfile.TemporaryFile("a+")
    process = subprocess.Popen([sys.executable, "-m", "service", "--port", str(port)], cwd=ROOT, env=env,
                               stdout=log, stderr=subprocess.STDOUT, text=True)
    process.log = log
    url = f"http://127.0.0.1:{port}"
    if not wait_ready(url, process, timeout):
        process.kill()
        process.wait()
        raise RuntimeError(f"the server did not become ready in {timeout:g} s: {output(process)[-2000:]}")
    return process, url


def output(process: subprocess.Popen) -> str:
    """What a server of start_server has written so far, stdout and stderr."""
    process.log.seek(0)
    return process.log.read()


def wait_ready(url: str, process: subprocess.Popen, timeout: float, interval: float = 0.2) -> bool:
    """Poll {url}/readyz until it answers 200 (True) or `timeout` passes (False); RuntimeError,
    with its output where it is captured, if the process exits first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            written = output(process) if hasattr(process, "log") else process.stdout.read() if process.stdout else ""
            raise RuntimeError(f"the server exited with status {process.returncode}: {written}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(interval)
    return False


def stop(process: subprocess.Popen) -> int:
    """SIGTERM (graceful drain), then the exit status; killed after 30 s."""
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        return -9
