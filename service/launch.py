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
    """(process, base URL) of a ready server on ONNX Runtime; settings: e.g. max_batch_size=32."""
    port = free_port()
    env = {**os.environ, "ACMIX_BACKEND": "onnxruntime", "ACMIX_ONNX_PATH": str(onnx_path),
           "ACMIX_LOG_LEVEL": "warning"}
    env.update({f"ACMIX_{name.upper()}": str(value) for name, value in settings.items()})
    process = subprocess.Popen([sys.executable, "-m", "service", "--port", str(port)], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited: {process.stdout.read()}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"the server did not become ready in {timeout:g} s")


def stop(process: subprocess.Popen) -> int:
    """SIGTERM (graceful drain), then the exit status; killed after 30 s."""
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        return -9
