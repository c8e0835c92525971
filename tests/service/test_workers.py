"""Several server processes on one host (service/workers.py): two real workers on loopback."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from harness import server as launch
from service.settings import Settings
from service.workers import Peers


def upload(data: bytes) -> dict:
    return {"file": ("a.jpg", data, "image/jpeg")}


def children(pid: int) -> set[int]:
    done = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return {int(line) for line in done.stdout.split()}


@pytest.fixture
def two_workers(tiny_onnx):
    # The tiny model: what is tested is the processes, not the network.
    process, url = launch.start_server(tiny_onnx, workers=2, max_batch_size=8, timeout=120)
    yield process, url
    launch.stop(process)


def test_requests_reach_both_workers_and_the_metrics_count_all_of_them(two_workers, cifar_like_jpegs):
    process, url = two_workers
    workers = set()
    for i in range(40):  # a new connection each: the kernel spreads them over both sockets
        response = httpx.post(f"{url}/predict", files=upload(cifar_like_jpegs[i % len(cifar_like_jpegs)]))
        assert response.status_code == 200
        workers.add(response.headers["x-worker"])
    assert workers == {"0", "1"}
    for _ in range(3):  # whichever worker answers /metrics counts both
        text = httpx.get(f"{url}/metrics").text
        (count,) = re.findall(r'^http_requests_total\{method="POST",route="/predict",status="200"\} (\S+)$', text, re.M)
        assert float(count) == 40.0
    assert len(children(process.pid)) == 2


def test_a_killed_worker_is_replaced_and_readiness_dips_meanwhile(two_workers):
    process, url = two_workers
    before = children(process.pid)
    os.kill(min(before), signal.SIGKILL)
    seen_not_ready, deadline = False, time.time() + 60
    while time.time() < deadline:
        try:
            status = httpx.get(f"{url}/readyz", timeout=2).status_code
        except httpx.TransportError:
            # A probe the kernel had queued on the killed worker's socket (SO_REUSEPORT) is reset.
            status = None
            time.sleep(0.05)
            continue
        seen_not_ready |= status == 503
        if seen_not_ready and status == 200:
            break
        time.sleep(0.05)
    after = children(process.pid)
    assert seen_not_ready and status == 200
    assert len(after) == 2 and min(before) not in after


def queued(url: str) -> float:
    """The batch queue length summed over the server's processes, from /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return sum(float(v) for v in re.findall(r"^\w*batch_queue_length(?:\{[^}]*\})? (\S+)$", text, re.M))


def test_sigterm_drains_both_workers_with_requests_in_flight(tiny_onnx, cifar_like_jpegs):
    process, url = launch.start_server(tiny_onnx, workers=2, max_queue_delay_ms=5000, max_batch_size=64, timeout=120,
                                       log_level="info")
    files = cifar_like_jpegs * 2
    with ThreadPoolExecutor(len(files)) as pool:
        futures = [pool.submit(lambda d: httpx.post(f"{url}/predict", files=upload(d), timeout=30), data)
                   for data in files]
        # The signal once every request is in a batcher's queue (accepted), however loaded the machine.
        end = time.monotonic() + 4
        while queued(url) < len(files) and time.monotonic() < end:
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        responses = [f.result() for f in futures]
    assert [r.status_code for r in responses] == [200] * len(responses)
    assert {r.headers["x-worker"] for r in responses} == {"0", "1"}
    assert process.wait(timeout=60) == 0
    assert "all workers stopped" in process.stdout.read()


def test_peers_are_ready_only_together(tmp_path):
    (tmp_path / "ready").mkdir()
    first, second = Peers(0, 2, tmp_path), Peers(1, 2, tmp_path)
    first.mark_ready()
    assert not first.all_ready()
    second.mark_ready()
    assert first.all_ready() and second.all_ready()
    (tmp_path / "ready" / "1").write_text("999999999")  # a pid that is not alive
    assert not first.all_ready()
    assert Peers().all_ready()  # a single process


def test_worker_counts_and_threads_by_host(monkeypatch):
    import service.settings

    monkeypatch.setattr(service.settings, "available_cores", lambda: 16)
    settings = Settings(workers="auto", inference_workers=2)
    assert settings.resolved_workers("onnxruntime") == 4 and settings.resolved_workers("tensorrt") == 4
    monkeypatch.setattr(service.settings, "available_cores", lambda: 2)
    assert settings.resolved_workers("onnxruntime") == 2 and settings.resolved_workers("tensorrt") == 1
    monkeypatch.setattr(service.settings, "available_cores", lambda: 1)
    assert settings.resolved_workers("onnxruntime") == 1
    monkeypatch.setattr(service.settings, "available_cores", lambda: 16)
    assert Settings(workers="3").resolved_workers("tensorrt") == 3
    assert settings.threads_per_batch(2) == 4  # 2 processes x 2 batches at once x 4 threads = 16 cores
    assert Settings(intra_op_threads=3).threads_per_batch(2) == 3
    # By default two batches at once in a single process, one each where there are several.
    default = Settings()
    assert default.batches_per_process(1) == 2 and default.threads_per_batch(1) == 8
    assert default.batches_per_process(4) == 1 and default.threads_per_batch(4) == 4
    assert Settings(inference_workers=3).batches_per_process(4) == 3
