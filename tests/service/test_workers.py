"""Several server processes on one host (service/workers.py): two real workers on loopback."""

from __future__ import annotations

import base64
import importlib.util
import os
import re
import signal
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
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
    log = launch.output(process)
    assert "all workers stopped" in log
    assert f"HTTP on {url}, 2 worker processes" in log  # uvicorn does not name it for a shared socket
    assert " INFO worker 0 service: " in log and " INFO worker 1 service: " in log  # whose line it is



def infer_image_http(url: str, data: bytes) -> str:
    """One image to the image model over KServe v2 HTTP, on a new connection; the worker that answered."""
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(data).decode()]}]}
    response = httpx.post(f"{url}/v2/models/alexnet_acmix_image/infer", json=body, timeout=30)
    assert response.status_code == 200, response.text
    return response.headers["x-worker"]


def infer_tensor_grpc(address: str, images: int) -> None:
    """`images` images to the tensor model over gRPC, on a new channel."""
    import tritonclient.grpc as triton_grpc

    client = triton_grpc.InferenceServerClient(address)
    try:
        tensor = triton_grpc.InferInput("image", [images, 3, 128, 128], "FP32")
        tensor.set_data_from_numpy(np.zeros((images, 3, 128, 128), np.float32))
        client.infer("alexnet_acmix", [tensor])
    finally:
        client.close()


def statistics_http(url: str) -> tuple[dict, str]:
    """GET /v2/models/stats on a new connection: (the answer, the worker that gave it)."""
    response = httpx.get(f"{url}/v2/models/stats", timeout=10)
    assert response.status_code == 200
    return response.json(), response.headers["x-worker"]


def statistics_grpc(address: str) -> dict:
    """tritonclient.grpc's get_inference_statistics on a new channel, in the HTTP answer's JSON form."""
    import tritonclient.grpc as triton_grpc
    from google.protobuf import json_format

    client = triton_grpc.InferenceServerClient(address)
    try:
        message = client.get_inference_statistics()
    finally:
        client.close()
    answer = json_format.MessageToDict(message, preserving_proto_field_name=True,
                                       always_print_fields_with_no_presence=True)
    for model in answer["model_stats"]:  # Triton's, that this server does not fill
        assert model.pop("memory_usage") == [] and model.pop("response_stats") == {}
    return numbers(answer)


UINT64 = ("last_inference", "inference_count", "execution_count", "batch_size", "count", "ns")


def numbers(value):
    """protobuf's JSON writes uint64 as strings and leaves zeros out: as the HTTP answer has them."""
    if isinstance(value, dict):
        if set(value) <= {"count", "ns"}:  # a StatisticDuration
            return {"count": int(value.get("count", 0)), "ns": int(value.get("ns", 0))}
        return {key: int(item) if key in UINT64 else numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [numbers(item) for item in value]
    return value


def read_everywhere(url: str, address: str) -> dict:
    """The statistics read on new connections until both workers have answered over HTTP (and as
    many times over gRPC, whose worker is not named), through raw HTTP and both tritonclients:
    every answer must be the same; that one."""
    import tritonclient.http as triton_http

    answers, workers = [], set()
    for _ in range(40):
        answer, worker = statistics_http(url)
        answers.append(answer)
        answers.append(statistics_grpc(address))
        workers.add(worker)
        if workers == {"0", "1"} and len(answers) >= 16:
            break
    assert workers == {"0", "1"}
    client = triton_http.InferenceServerClient(url.removeprefix("http://"))
    answers.append(client.get_inference_statistics())
    client.close()
    for answer in answers[1:]:
        assert answer == answers[0]
    return answers[0]


def check_figures(stats: dict, requests: dict[str, int], images: dict[str, int]) -> dict[str, dict]:
    """Each model's statistics against the requests and images sent (all successful), in Triton's
    form; by model."""
    by_model = {model["name"]: model for model in stats["model_stats"]}
    assert list(by_model) == ["alexnet_acmix", "alexnet_acmix_image"]
    for name, model in by_model.items():
        inference = model["inference_stats"]
        assert model["inference_count"] == images[name]
        assert inference["success"]["count"] == requests[name] and inference["fail"] == {"count": 0, "ns": 0}
        assert inference["cache_hit"] == inference["cache_miss"] == {"count": 0, "ns": 0}
        assert sum(entry["compute_infer"]["count"] for entry in model["batch_stats"]) == model["execution_count"]
        assert sum(entry["batch_size"] * entry["compute_infer"]["count"] for entry in model["batch_stats"]) == \
            images[name]
    return by_model


def only_grew(before: dict, after: dict) -> None:
    """Every count and duration of `after` at least `before`'s (a batch size once seen stays)."""

    def figures(stats: dict) -> dict:
        found = {}
        for model in stats["model_stats"]:
            name = model["name"]
            found.update({(name, key): model[key] for key in ("last_inference", "inference_count",
                                                              "execution_count")})
            for kind, duration in model["inference_stats"].items():
                found.update({(name, kind, field): duration[field] for field in ("count", "ns")})
            for entry in model["batch_stats"]:
                for kind in ("compute_input", "compute_infer", "compute_output"):
                    found.update({(name, entry["batch_size"], kind, field): entry[kind][field]
                                  for field in ("count", "ns")})
        return found

    old, new = figures(before), figures(after)
    assert set(old) <= set(new)
    assert [key for key in old if new[key] < old[key]] == []


def test_statistics_are_the_whole_servers_on_both_protocols_and_only_grow(tiny_onnx, cifar_like_jpegs):
    """Triton's statistics as perf_analyzer reads them (an answer before, one after): whichever
    worker answers, over HTTP or gRPC, answers for the whole server, the same figures, and they only
    grow, over a worker's death and replacement too. They used to be each process's own: a few
    reads in a row gave 91, 0, 0, 0, 91."""
    grpc_port = launch.free_port()
    process, url = launch.start_server(tiny_onnx, workers=2, max_batch_size=8, grpc_port=grpc_port, timeout=120)
    address = f"127.0.0.1:{grpc_port}"
    try:
        workers = {infer_image_http(url, cifar_like_jpegs[i % len(cifar_like_jpegs)]) for i in range(16)}
        assert workers == {"0", "1"}  # both hold some of the requests
        for _ in range(6):
            infer_tensor_grpc(address, 2)
        requests, images = {"alexnet_acmix": 6, "alexnet_acmix_image": 16}, {"alexnet_acmix": 12,
                                                                             "alexnet_acmix_image": 16}
        before = read_everywhere(url, address)
        check_figures(before, requests, images)
        for _ in range(3):  # Triton's metrics on /metrics, whichever worker answers, the same sums
            text = httpx.get(f"{url}/metrics").text
            for model, count in requests.items():
                assert f'nv_inference_request_success{{model="{model}",version="1"}} {count}' in text
                assert f'nv_inference_count{{model="{model}",version="1"}} {images[model]}' in text

        killed = min(children(process.pid))
        os.kill(killed, signal.SIGKILL)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            replaced = len(children(process.pid) - {killed}) == 2
            try:
                if replaced and httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:  # a probe queued on the killed worker's socket
                pass
            time.sleep(0.1)
        else:
            pytest.fail("the killed worker was not replaced")
        after_restart = read_everywhere(url, address)
        assert after_restart == before  # nothing of the dead worker's is lost

        last = after_restart
        for i in range(4):  # each answer after a request counts it, on either protocol, whoever answers
            if i % 2:
                infer_tensor_grpc(address, 1)
                requests["alexnet_acmix"] += 1
                images["alexnet_acmix"] += 1
            else:
                infer_image_http(url, cifar_like_jpegs[i])
                requests["alexnet_acmix_image"] += 1
                images["alexnet_acmix_image"] += 1
            for answer in (statistics_http(url)[0], statistics_grpc(address), statistics_http(url)[0]):
                check_figures(answer, requests, images)
                only_grew(last, answer)
                last = answer
    finally:
        launch.stop(process)


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
    assert settings.resolved_workers("onnxruntime") == 8 and settings.resolved_workers("tensorrt") == 4
    assert Settings(workers="auto").threads_per_batch(8) == 2  # 8 processes of one 2-thread batch
    monkeypatch.setattr(service.settings, "available_cores", lambda: 2)
    assert settings.resolved_workers("onnxruntime") == 2 and settings.resolved_workers("tensorrt") == 1
    monkeypatch.setattr(service.settings, "available_cores", lambda: 3)
    assert settings.resolved_workers("onnxruntime") == 2
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


def test_a_workers_socket_takes_no_connection_until_it_listens():
    """Bound at start, listening only once uvicorn has started the app: the kernel hands a worker
    still loading no connection (they used to wait seconds in its backlog)."""
    import socket

    from service.workers import reuse_port_socket

    sock = reuse_port_socket("127.0.0.1", launch.free_port())
    try:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(sock.getsockname(), timeout=2).close()
        sock.listen()
        socket.create_connection(sock.getsockname(), timeout=2).close()
    finally:
        sock.close()


# A stand-in worker (not the service): the first one becomes ready, then dies; the rest die at start.
FLAKY_WORKER = """
import os, sys, time
folder, index = os.environ["ACMIX_WORKER_FOLDER"], os.environ["ACMIX_WORKER_INDEX"]
spawned = os.environ["FLAKY_SPAWNED"]
count = len(open(spawned).read()) if os.path.exists(spawned) else 0
open(spawned, "a").write("x")
if count == 0:
    open(os.path.join(folder, "ready", index), "w").write(str(os.getpid()))
    time.sleep(0.6)
sys.exit(1)
"""


def test_a_worker_that_dies_after_serving_is_not_a_failure_to_start(tmp_path, monkeypatch):
    """Three exits in a row before becoming ready stop the supervisor; the death of a worker that
    had served is not one of them (it used to count: two startup failures then stopped it)."""
    import sys

    from service import workers

    monkeypatch.setattr(workers, "worker_command", lambda index, argv: [sys.executable, "-c", FLAKY_WORKER])
    monkeypatch.setenv("FLAKY_SPAWNED", str(tmp_path / "spawned"))
    assert workers.supervise(1, [], drain_s=5) == 1
    assert len((tmp_path / "spawned").read_text()) == 1 + workers.STARTUP_FAILURES


def test_a_worker_ends_when_its_supervisor_is_killed(tmp_path):
    """SIGKILL or the OOM killer on the supervisor: its workers drain and exit, not serve on as orphans."""
    import sys

    script = ("import subprocess, sys, time\n"
              "child = subprocess.Popen([sys.executable, '-c', 'import signal, sys, time; "
              "from service.workers import die_with_supervisor; "
              "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0)); die_with_supervisor(); time.sleep(60)'])\n"
              "print(child.pid, flush=True)\n"
              "time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    child = int(parent.stdout.readline())
    time.sleep(1.0)  # the child has asked to die with its parent
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while running(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    if running(child):
        os.kill(child, signal.SIGKILL)
        pytest.fail("the worker outlived its supervisor")


def running(pid: int) -> bool:
    """Alive and not a zombie waiting for whoever adopted it to reap it."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_failing_worker_among_several_drains_and_exits_so_that_it_is_replaced(monkeypatch, tmp_path):
    """Past ACMIX_MAX_CONSECUTIVE_FAILURES a lone process reports itself not live (an orchestrator
    restarts it); one of several sends itself SIGTERM (os.kill faked here) for the supervisor."""
    from service import state as state_module
    from service.metrics import Metrics
    from service.state import ServiceState

    signals = []
    monkeypatch.setattr(state_module.os, "kill", lambda pid, sig: signals.append((pid, sig)))
    (tmp_path / "ready").mkdir()
    state = ServiceState(Settings(max_consecutive_failures=2), Metrics(), peers=Peers(0, 2, tmp_path))
    state.peers.mark_ready()
    state.batch_failed(8, RuntimeError("cuda error"))
    assert signals == []
    state.batch_failed(8, RuntimeError("cuda error"))
    assert signals == [(os.getpid(), signal.SIGTERM)] and state.draining
    assert not (tmp_path / "ready" / "0").exists()
    state.batch_failed(8, RuntimeError("cuda error"))
    assert len(signals) == 1  # once
    alone = ServiceState(Settings(max_consecutive_failures=1), Metrics())
    alone.batch_failed(8, RuntimeError("cuda error"))
    assert len(signals) == 1 and alone.failing


def test_a_second_supervisor_on_the_same_port_is_refused():
    """SO_REUSEPORT would let its workers share the port with the first service's."""
    from service.workers import PortTaken, claimed_port

    port = launch.free_port()
    with claimed_port("127.0.0.1", port):
        with pytest.raises(PortTaken, match=f"another python -m service --workers serves 127.0.0.1:{port}"):
            with claimed_port("127.0.0.1", port):
                pass
        with claimed_port("127.0.0.1", port + 1):  # another port is free
            pass
    with claimed_port("127.0.0.1", port):  # released with the first
        pass
    lock = Path(tempfile.gettempdir()) / f"acmix-service-127.0.0.1-{port}.lock"
    assert not lock.exists()  # removed on release


def test_a_lock_file_removed_by_its_holder_between_open_and_lock_is_not_taken(monkeypatch):
    """The race the removal opens: this supervisor opens the lock file, the holder releases it
    (removing it) and a third supervisor claims the port on a new file, then this one's lock
    succeeds on the removed file. It must see that and be refused on the new one. The interleaving
    is forced by a wrapper around fcntl.flock (the real flock still does the locking)."""
    import fcntl as real_fcntl

    from service import workers
    from service.workers import PortTaken, claimed_port

    port = launch.free_port()
    lock = Path(tempfile.gettempdir()) / f"acmix-service-127.0.0.1-{port}.lock"
    flock, third = real_fcntl.flock, []

    def flock_after_a_release(fd, operation):
        if not third:  # first call: the holder goes and a third supervisor comes, before our lock
            lock.unlink()
            third.append(open(lock, "a+b"))
            flock(third[0].fileno(), real_fcntl.LOCK_EX | real_fcntl.LOCK_NB)
        return flock(fd, operation)

    lock.touch()
    monkeypatch.setattr(workers.fcntl, "flock", flock_after_a_release)
    try:
        with pytest.raises(PortTaken):
            with claimed_port("127.0.0.1", port):
                pass
    finally:
        third[0].close()
        lock.unlink(missing_ok=True)


def test_a_backend_that_refuses_to_load_stops_the_supervisor_without_retries(tiny_onnx):
    """An ONNX whose recorded temperature is not a positive number: every worker would refuse it, so
    the supervisor stops at the first refusal (status STARTUP_REFUSED) instead of starting each
    worker STARTUP_FAILURES times; one line per worker that tried, no traceback."""
    import onnx

    model = onnx.load(str(tiny_onnx))
    model.metadata_props.add(key="temperature", value="0")
    onnx.save(model, str(tiny_onnx))
    with pytest.raises(RuntimeError, match="exited with status 1:") as failure:
        launch.start_server(tiny_onnx, workers=2, timeout=120)
    output = str(failure.value)
    assert "worker 0 could not start (the cause is above: its backend or its port)" in output or \
        "worker 1 could not start (the cause is above: its backend or its port)" in output
    assert 1 <= output.count("the backend did not load: ") <= 2
    assert "temperature '0' in its metadata is not a positive number" in output
    assert "Traceback" not in output


def test_a_precision_the_backend_cannot_run_is_refused_in_one_line_before_anything_is_made(tiny_onnx):
    """fp16 on ONNX Runtime's CPU provider: the fp16 file was made first, then every worker refused it."""
    import subprocess
    import sys

    env = {**os.environ, "ACMIX_BACKEND": "onnxruntime", "ACMIX_PRECISION": "fp16", "ACMIX_ONNX_PATH": str(tiny_onnx),
           "ACMIX_WEIGHTS_PATH": "unused.pdparams", "ACMIX_WORKERS": "2", "ACMIX_GRPC_PORT": "0"}
    done = subprocess.run([sys.executable, "-m", "service", "--port", str(launch.free_port())], env=env,
                          cwd=launch.ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr == ("error: precision fp16: ONNX Runtime runs fp16 on the CPU slower than fp32 (no fp16 "
                           "convolution kernels); use fp32 or int8 there (ACMIX_BACKEND=onnxruntime, ACMIX_PRECISION=fp16)\n")
    assert sorted(p.name for p in tiny_onnx.parent.iterdir()) == ["tiny.onnx"]


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_the_tensorrt_backend_asked_for_where_it_cannot_run_is_refused_in_one_line(tiny_onnx):
    """It started an engine build in a child, which printed its error, and then said it again."""
    import subprocess
    import sys

    env = {**os.environ, "ACMIX_BACKEND": "tensorrt", "ACMIX_ONNX_PATH": str(tiny_onnx),
           "ACMIX_WEIGHTS_PATH": "unused.pdparams", "ACMIX_GRPC_PORT": "0"}
    done = subprocess.run([sys.executable, "-m", "service", "--port", str(launch.free_port())], env=env,
                          cwd=launch.ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.startswith("error: the TensorRT backend cannot run here: TensorRT is not installed")
    assert done.stderr.endswith("(ACMIX_BACKEND=tensorrt, ACMIX_PRECISION=fp32)\n") and done.stderr.count("\n") == 1
