"""Start `python -m service` as a child process on loopback and wait until it is ready.

For the tests and benchmarks that need a real server; settings go in as ACMIX_* variables.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
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
    process = subprocess.Popen([sys.executable, "-m", "service", "--port", str(port)], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    if not wait_ready(url, process, timeout):
        process.kill()
        raise RuntimeError(f"the server did not become ready in {timeout:g} s")
    return process, url


def wait_ready(url: str, process: subprocess.Popen, timeout: float, interval: float = 0.2) -> bool:
    """Poll {url}/readyz until it answers 200 (True) or `timeout` passes (False); RuntimeError,
    with its output where it is captured, if the process exits first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            output = process.stdout.read() if process.stdout else ""
            raise RuntimeError(f"the server exited with status {process.returncode}: {output}")
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
