"""A real `python -m service` process on loopback: HTTP, tritonclient, graceful shutdown."""

from __future__ import annotations

import base64
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from harness import server as launch
from harness.server import stop
from model.preprocessing import decode_image, preprocess
from tests.conftest import run_onnx


def start_server(onnx_model, **settings):
    """The server with the suite's small batches unless a test asks otherwise."""
    return launch.start_server(onnx_model, **{"max_batch_size": 8, **settings})


@pytest.fixture(scope="module")
def served(onnx_model):
    """(HTTP base URL, gRPC address) of one real server for the module."""
    grpc_port = launch.free_port()
    # a short body timeout for test_a_body_sent_too_slowly_gets_408_on_every_route; the others send at once
    process, url = start_server(onnx_model, grpc_port=grpc_port, body_timeout_s=2)
    yield url, f"127.0.0.1:{grpc_port}"
    stop(process)


@pytest.fixture(scope="module")
def server(served):
    return served[0]


def test_predict_over_real_http(server, cifar_like_jpegs):
    response = httpx.post(f"{server}/predict", files={"file": ("a.jpg", cifar_like_jpegs[2], "image/jpeg")})
    assert response.status_code == 200 and response.json()["backend"] == "onnxruntime"
    ready = httpx.get(f"{server}/readyz").json()
    assert ready["ready"] and ready["backend_reason"] == "set by ACMIX_BACKEND=onnxruntime"


def test_tritonclient_json_binary_and_classification(server, onnx_model, cifar_like_jpegs):
    import tritonclient.http as triton

    client = triton.InferenceServerClient(server.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("alexnet_acmix")
    metadata = client.get_model_metadata("alexnet_acmix")
    assert metadata["inputs"][0] == {"name": "image", "datatype": "FP32", "shape": [-1, 3, 128, 128]}
    assert client.get_server_metadata()["extensions"] == ["binary_tensor_data", "classification"]

    batch = np.stack([preprocess(decode_image(data)) for data in cifar_like_jpegs[:5]])
    expected = run_onnx(onnx_model, batch)
    for binary in (True, False):
        tensor = triton.InferInput("image", list(batch.shape), "FP32")
        tensor.set_data_from_numpy(batch, binary_data=binary)
        outputs = [triton.InferRequestedOutput("logits", binary_data=binary)]
        logits = client.infer("alexnet_acmix", [tensor], outputs=outputs).as_numpy("logits")
        np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)

    tensor = triton.InferInput("image", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch)
    top = client.infer("alexnet_acmix", [tensor],
                       outputs=[triton.InferRequestedOutput("logits", class_count=3)]).as_numpy("logits")
    assert top.shape == (5, 3)
    first = [entry.decode().split(":") for entry in top[:, 0]]
    assert [int(index) for _, index, _ in first] == expected.argmax(1).tolist()
    from model.spec import CLASSES
    assert [label for _, _, label in first] == [CLASSES[i] for i in expected.argmax(1)]


def test_both_models_through_tritonclient_http_and_grpc_on_a_real_server(served, onnx_model, cifar_like_jpegs):
    import tritonclient.grpc as triton_grpc
    import tritonclient.http as triton_http

    url, address = served
    files = cifar_like_jpegs[:3]
    batch = np.stack([preprocess(decode_image(data)) for data in files])
    expected = run_onnx(onnx_model, batch)
    http = triton_http.InferenceServerClient(url.removeprefix("http://"))
    image = triton_http.InferInput("image", [3], "BYTES")
    image.set_data_from_numpy(np.array(files, dtype=object), binary_data=True)
    logits = http.infer("alexnet_acmix_image", [image]).as_numpy("logits")
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
    grpc = triton_grpc.InferenceServerClient(address)
    assert grpc.is_server_ready() and grpc.is_model_ready("alexnet_acmix_image")
    for model, tensor in (("alexnet_acmix", triton_grpc.InferInput("image", list(batch.shape), "FP32")),
                          ("alexnet_acmix_image", triton_grpc.InferInput("image", [3], "BYTES"))):
        tensor.set_data_from_numpy(batch if model == "alexnet_acmix" else np.array(files, dtype=object))
        np.testing.assert_allclose(grpc.infer(model, [tensor]).as_numpy("logits"), expected, rtol=1e-4, atol=1e-4)
    grpc.close()


KSERVE_SDK = launch.ROOT / ".venv" / "kserve-sdk" / "bin" / "python"


@pytest.mark.skipif(not KSERVE_SDK.exists(), reason="KServe's SDK is not installed in .venv/kserve-sdk (make test "
                                                    "installs it; it needs a venv of its own, protobuf<7)")
def test_kserve_sdk_clients_over_rest_and_grpc_on_a_real_server(served, tmp_path):
    """KServe's own InferenceRESTClient and InferenceGRPCClient, run in their venv by harness/kserve_sdk.py:
    every check passes, each answer the class /predict gives the same image."""
    import subprocess

    from tests.conftest import jpeg_bytes, synthetic_images

    url, address = served
    images, _ = synthetic_images(per_class=1, seed=5)
    for i, image in enumerate(images):
        (tmp_path / f"{i:02d}.png").write_bytes(jpeg_bytes(image, "PNG"))
    for i, image in enumerate(images[:2]):
        (tmp_path / f"{i:02d}.jpg").write_bytes(jpeg_bytes(image))
    run = subprocess.run([str(KSERVE_SDK), "-m", "harness.kserve_sdk", "--http", url, "--grpc", address,
                          "--images", str(tmp_path)], cwd=launch.ROOT, capture_output=True, text=True, timeout=300)
    failed = [line for line in run.stdout.splitlines() if line.startswith("FAIL")]
    assert run.returncode == 0 and not failed, (failed, run.stderr[-2000:])
    assert "SUMMARY" in run.stdout and " 0 failed" in run.stdout


def test_a_deeply_nested_body_is_a_400_and_the_connection_keeps_serving(server):
    with httpx.Client(base_url=server) as client:  # one keep-alive connection
        response = client.post("/v2/models/alexnet_acmix/infer", content=b"[" * 100_000 + b"]" * 100_000)
        assert response.status_code == 400 and "too deeply" in response.json()["error"]
        assert client.get("/v2/health/ready").status_code == 200


def test_tritonclient_http_repository_index_compression_and_the_extensions_this_server_lacks(server, onnx_model,
                                                                                            cifar_like_jpegs):
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    client = triton.InferenceServerClient(server.removeprefix("http://"))
    assert [(m["name"], m["state"]) for m in client.get_model_repository_index()] == [
        ("alexnet_acmix", "READY"), ("alexnet_acmix_image", "READY")]
    batch = np.stack([preprocess(decode_image(data)) for data in cifar_like_jpegs[:2]])
    tensor = triton.InferInput("image", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch)
    for algorithm in ("gzip", "deflate"):  # a compressed request, decompressed by the server
        logits = client.infer("alexnet_acmix", [tensor], request_compression_algorithm=algorithm).as_numpy("logits")
        np.testing.assert_allclose(logits, run_onnx(onnx_model, batch), rtol=1e-4, atol=1e-4)
    stats = client.get_inference_statistics("alexnet_acmix")["model_stats"][0]  # the two gzip and deflate requests
    assert stats["inference_count"] >= 4 and stats["inference_stats"]["success"]["count"] >= 2
    assert [m["name"] for m in client.get_inference_statistics()["model_stats"]] == ["alexnet_acmix",
                                                                                     "alexnet_acmix_image"]
    for call, message in ((lambda: client.unload_model("alexnet_acmix"), "loading and unloading models"),
                          (client.get_trace_settings, "trace extension"),
                          (client.get_cuda_shared_memory_status, "shared-memory extensions")):
        with pytest.raises(InferenceServerException, match=message):
            call()


@pytest.mark.parametrize("path, content_type, start", [
    ("/predict", "multipart/form-data; boundary=b",
     b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n\x89PNG'),
    ("/v2/models/alexnet_acmix/infer", "application/json", b'{"inputs": [{"name": "image", '),
])
def test_a_body_sent_too_slowly_gets_408_on_every_route(server, path, content_type, start):
    """A client that sends part of its body, then nothing (slowloris), gets 408 once the body
    timeout (2 s here) passes. /predict used to answer 400: FastAPI's form parser turned the
    timeout into its own error."""
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
                           f"Content-Length: 100000\r\n\r\n".encode() + start)
        began = time.monotonic()
        answer = b""
        while chunk := connection.recv(4096):  # headers and body may come apart; the server then closes
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b"not received within 2 s" in answer and 1.5 < time.monotonic() - began < 8
    assert (b'{"error":' if path.startswith("/v2") else b'{"detail":') in answer  # each API's error format
    assert httpx.get(f"{server}/readyz").status_code == 200


def test_unknown_model_is_404(server):
    response = httpx.post(f"{server}/v2/models/resnet/infer", json={"inputs": []})
    assert response.status_code == 404 and "unknown model 'resnet'" in response.json()["error"]


def test_sigterm_finishes_requests_in_flight_then_exits(onnx_model, cifar_like_jpegs):
    # A long queue delay keeps the requests waiting in the batcher when the signal arrives.
    process, url = start_server(onnx_model, max_queue_delay_ms=1500, max_batch_size=64, log_level="info")

    def post(data):
        return httpx.post(f"{url}/predict", files={"file": ("a.jpg", data, "image/jpeg")}, timeout=30).status_code

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(post, data) for data in cifar_like_jpegs[:8]]
        time.sleep(0.7)
        process.send_signal(signal.SIGTERM)
        statuses = [f.result() for f in futures]
    assert statuses == [200] * 8
    # uvicorn re-raises the signal once shut down, so a clean exit reads as "terminated by SIGTERM".
    assert process.wait(timeout=30) == 0  # a clean stop
    assert "drained and closed" in launch.output(process)
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/healthz", timeout=1)


def test_sigterm_drains_grpc_requests_in_flight_too(onnx_model, cifar_like_jpegs):
    import tritonclient.grpc as triton

    grpc_port = launch.free_port()
    process, _ = start_server(onnx_model, max_queue_delay_ms=1500, max_batch_size=64, grpc_port=grpc_port)
    client = triton.InferenceServerClient(f"127.0.0.1:{grpc_port}")

    def infer(data):
        tensor = triton.InferInput("image", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([data], dtype=object))
        return client.infer("alexnet_acmix_image", [tensor], client_timeout=30).as_numpy("logits").shape

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(infer, data) for data in cifar_like_jpegs[:6]]
        time.sleep(0.7)
        process.send_signal(signal.SIGTERM)
        shapes = [f.result() for f in futures]
    assert shapes == [(1, 10)] * 6
    assert process.wait(timeout=30) == 0  # a clean stop
    client.close()


def test_a_backend_that_fails_its_check_stops_the_server_in_one_line(onnx_model, tmp_path):
    """The cause once, no traceback (service/__main__.py, OneLineLoadFailure), and the status that
    tells a supervisor not to start it again (STARTUP_REFUSED)."""
    import json
    import shutil

    from runtime.reference import reference_path

    onnx = shutil.copyfile(onnx_model, tmp_path / "m.onnx")
    record = json.loads(reference_path(onnx_model).read_text())
    record["logits"][0][0] += 3.0  # as if the artifact or the preprocessing were wrong
    reference_path(onnx).write_text(json.dumps(record))
    from service.workers import STARTUP_REFUSED

    with pytest.raises(RuntimeError, match=f"exited with status {STARTUP_REFUSED}:") as failure:
        start_server(onnx, timeout=60)
    output = str(failure.value)
    assert "ERROR service: the backend did not load: " in output and "reference check failed" in output
    assert "Traceback" not in output


@pytest.mark.parametrize("workers", [1, 2])
def test_a_port_another_program_holds_stops_the_server_in_one_line_before_it_loads(onnx_model, workers):
    """Checked before provisioning and loading (service/workers.py, port_problem): one line, status 2.
    It was a traceback from the gRPC server (one process), and six from the workers (two)."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(RuntimeError, match="exited with status 2: ") as failure:
            start_server(onnx_model, timeout=60, grpc_port=port, workers=workers, host="127.0.0.1")
    assert str(failure.value).split("status 2: ", 1)[1].strip() == \
        f"error: cannot listen on 127.0.0.1:{port} (Address already in use)"


def test_a_port_another_services_workers_share_is_taken_too():
    """Workers share their ports with SO_REUSEPORT; a second service's check must not join them (the
    kernel would split the first's gRPC calls with it)."""
    from service.workers import port_problem, reuse_port_socket

    with reuse_port_socket("127.0.0.1", 0) as shared:
        shared.listen()
        port = shared.getsockname()[1]
        assert port_problem("127.0.0.1", port) == f"cannot listen on 127.0.0.1:{port} (Address already in use)"
    assert port_problem("127.0.0.1", port) is None
    assert port_problem("999.1.1.1", port).startswith("cannot listen on 999.1.1.1:")


def test_a_worker_whose_port_was_taken_after_the_check_says_so_in_one_line(capsys):
    from service.__main__ import serve
    from service.settings import Settings
    from service.workers import STARTUP_REFUSED

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        assert serve(Settings(host="127.0.0.1", port=port, grpc_port=0), reuse_port=True) == STARTUP_REFUSED
    assert capsys.readouterr().err == f"error: cannot listen on 127.0.0.1:{port} (Address already in use)\n"


def test_a_client_gone_mid_body_is_logged_as_499_without_a_traceback_and_paths_are_logged_escaped(onnx_model):
    """A client that closes its connection before its body is in: status 499 in the log and the
    metrics (it was a 500 with a traceback on /v2, a 400 on /predict); the server keeps serving.
    A path's encoded newline stays encoded in the log line (it forged a line of its own); HEAD
    answers wherever GET does."""
    process, url = start_server(onnx_model, log_level="info")
    host, port = url.removeprefix("http://").split(":")
    try:
        for path, content_type, start in [
            ("/v2/models/alexnet_acmix/infer", "application/json", b'{"inputs":'),
            ("/v2/repository/index", "application/json", b"{"),
            ("/predict", "multipart/form-data; boundary=b",
             b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n\x89PNG'),
        ]:
            with socket.create_connection((host, int(port)), timeout=10) as connection:
                connection.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
                                   f"Content-Length: 1000\r\n\r\n".encode() + start)
                time.sleep(0.2)
        forged = "x%0A2026-12-04 00:00:00,000 INFO service.requests: request id=FORGED status=200"
        assert httpx.get(f"{url}/v2/models/{forged.replace(' ', '%20')}").status_code == 404
        head = httpx.head(f"{url}/healthz")
        assert head.status_code == 200 and head.content == b"" and int(head.headers["content-length"]) > 0
        assert httpx.head(f"{url}/v2").status_code == 200 and httpx.head(f"{url}/predict").status_code == 405
        deadline = time.monotonic() + 10
        while 'status="499"' not in (metrics := httpx.get(f"{url}/metrics").text) and time.monotonic() < deadline:
            time.sleep(0.1)
        closed = [line for line in metrics.splitlines() if line.startswith("http_requests_total") and '"499"' in line]
        assert len(closed) == 3, closed
        assert httpx.get(f"{url}/readyz").status_code == 200
    finally:
        stop(process)
    log = launch.output(process)
    assert "Traceback" not in log and "status=500" not in log, log[-3000:]
    for route in ("POST /v2/models/alexnet_acmix/infer", "POST /v2/repository/index", "POST /predict"):
        assert f"route={route} status=499" in log, log[-3000:]
    assert "id=FORGED" in log and not any(line.startswith("2026-12-04 00:00:00") for line in log.splitlines())
    assert "route=GET /v2/models/x%0A2026-12-04%2000:00:00,000%20INFO" in log
    assert "route=HEAD /healthz status=200" not in log  # health checks stay out of the log, HEAD too


def test_a_server_that_logs_more_than_a_pipe_holds_keeps_answering(onnx_model):
    """start_server's output went to a pipe that nobody read while the server ran: past 64 KiB of log
    lines the server blocked on its next line, and every request after it timed out."""
    process, url = start_server(onnx_model, log_level="info")
    name = "x" * 400  # each 404 is logged with its path: 200 of them are ~100 KB
    try:
        with httpx.Client(timeout=10) as client:
            codes = {client.get(f"{url}/v2/models/{name}{i}").status_code for i in range(200)}
        assert codes == {404}
    finally:
        stop(process)
    assert launch.output(process).count(f"/v2/models/{name}") >= 200


def test_a_client_gone_while_its_request_waits_for_a_batch_is_499_and_its_image_is_never_computed(
        onnx_model, cifar_like_jpegs):
    """A client that gave up (its timeout, then a retry) while its request waited in the queue: the
    image was computed anyway and the request logged as 200."""
    process, url = start_server(onnx_model, max_queue_delay_ms=3000, max_batch_size=64, log_level="info")
    host, port = url.removeprefix("http://").split(":")
    data = cifar_like_jpegs[0]
    boundary = b"b0undary"
    body = (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n'
            b"Content-Type: image/jpeg\r\n\r\n" + data + b"\r\n--" + boundary + b"--\r\n")
    try:
        for path, content_type, payload in [
            ("/predict", b"multipart/form-data; boundary=" + boundary, body),
            ("/v2/models/alexnet_acmix_image/infer", b"application/json",
             b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["'
             + base64.b64encode(data) + b'"]}]}'),
        ]:
            with socket.create_connection((host, int(port)), timeout=10) as connection:
                connection.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(payload)}\r\n"
                                   .encode() + b"Content-Type: " + content_type + b"\r\n\r\n" + payload)
                deadline = time.monotonic() + 2.5  # queued (its body read): a lone request waits 3 s for its batch
                while "batch_queue_length 1.0" not in httpx.get(f"{url}/metrics").text and time.monotonic() < deadline:
                    time.sleep(0.02)
                assert "batch_queue_length 1.0" in httpx.get(f"{url}/metrics").text
                if path.startswith("/v2"):  # Triton's pending count; once the client is gone, its failure's reason
                    assert ('nv_inference_pending_request_count{model="alexnet_acmix_image",version="1"} 1'
                            in httpx.get(f"{url}/metrics").text)
        time.sleep(3.5)  # past the queue delay, when the batch would have been cut
        metrics = httpx.get(f"{url}/metrics").text
        assert "images_classified_total 0.0" in metrics, [m for m in metrics.splitlines() if "images" in m]
        image = 'model="alexnet_acmix_image"'
        assert f'nv_inference_pending_request_count{{{image},version="1"}} 0' in metrics
        assert f'nv_inference_request_failure{{{image},reason="CANCELED",version="1"}} 1' in metrics
    finally:
        stop(process)
    log = launch.output(process)
    for route in ("POST /predict", "POST /v2/models/alexnet_acmix_image/infer"):
        assert f"route={route} status=499" in log, log[-3000:]
    assert "Traceback" not in log


def test_with_a_shutdown_delay_sigterm_turns_readiness_off_and_serves_on_until_the_drain(onnx_model, cifar_like_jpegs):
    """Kubernetes drops a stopping pod from its endpoints some time after it sent SIGTERM: the port
    closed at once refused the requests still routed to it meanwhile."""
    process, url = start_server(onnx_model, shutdown_delay_s=2.0, log_level="info")
    try:
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        ready = httpx.get(f"{url}/readyz", timeout=5)
        assert ready.status_code == 503 and ready.json()["error"].startswith("stopping: requests still served")
        answer = httpx.post(f"{url}/predict", files={"file": ("a.jpg", cifar_like_jpegs[0], "image/jpeg")}, timeout=5)
        assert answer.status_code == 200
        assert process.poll() is None
        process.wait(timeout=30)  # then it drains and exits
        assert time.monotonic() - signalled >= 2.0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert "drained and closed" in launch.output(process)


def test_a_second_signal_during_the_shutdown_delay_drains_and_the_delay_then_forces_nothing(onnx_model):
    """The delayed exit ran after a second signal had started the drain: uvicorn takes a second exit
    for "force", which cut the drain short and skipped the lifespan's shutdown (Ctrl-C with workers:
    SIGINT from the terminal, then SIGTERM from the supervisor). A fake state (the server's own)."""
    import asyncio

    import uvicorn

    from service.__main__ import DrainingServer
    from service.settings import Settings

    class Peers:
        def mark_not_ready(self):
            pass

    class State:
        settings = Settings(shutdown_delay_s=0.2)
        stopping = draining = False
        peers = Peers()

    async def signals():
        server = DrainingServer(uvicorn.Config(app=None), State())
        server.handle_exit(signal.SIGINT, None)
        assert server.state.stopping and not server.should_exit  # still serving
        # the same stop: a signal to the process group, then the supervisor's to its workers
        server.handle_exit(signal.SIGTERM, None)
        assert not server.state.draining and not server.should_exit
        server.first_signal -= 1.5  # a second signal, later
        server.handle_exit(signal.SIGTERM, None)
        assert server.state.draining and server.should_exit and not server.force_exit
        await asyncio.sleep(0.4)  # past the delay
        return server.force_exit

    assert asyncio.run(signals()) is False

    async def one_signal():  # a delay shorter than SAME_SIGNAL_S still ends in the drain
        server = DrainingServer(uvicorn.Config(app=None), State())
        server.handle_exit(signal.SIGTERM, None)
        await asyncio.sleep(0.4)
        return server.state.draining, server.should_exit, server.force_exit

    assert asyncio.run(one_signal()) == (True, True, False)


def test_ctrl_c_stops_a_single_process_cleanly_without_a_traceback(onnx_model):
    """uvicorn raises the signal again once it has drained: SIGINT ended in a KeyboardInterrupt
    traceback and status -2, SIGTERM in -15, where the supervisor of several exits 0."""
    process, url = start_server(onnx_model, log_level="info")
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=30) == 0
    log = launch.output(process)
    assert "drained and closed" in log and "Traceback" not in log and "KeyboardInterrupt" not in log


def test_ctrl_c_while_provisioning_kills_the_export_and_says_so_in_one_line(tmp_path):
    """It was a KeyboardInterrupt traceback out of run_child; SIGTERM was handled already."""
    import os
    import subprocess
    import sys

    onnx = tmp_path / "m.onnx"
    env = {**os.environ, "ACMIX_BACKEND": "onnxruntime", "ACMIX_ONNX_PATH": str(onnx),
           "ACMIX_GRPC_PORT": "0", "ACMIX_WORKERS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "service", "--provision-only"], cwd=launch.ROOT, env=env,
                               stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = []
    for line in process.stderr:  # the export has started in its child
        lines.append(line)
        if "making the onnx artifact" in line:
            break
    process.send_signal(signal.SIGINT)
    lines += process.stderr.read().splitlines()
    assert process.wait(timeout=30) == 130
    assert lines[-1] == "error: SIGINT while provisioning: stopped"
    assert not any("Traceback" in line for line in lines)
    assert not onnx.exists()
