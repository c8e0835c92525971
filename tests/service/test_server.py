"""A real `python -m service` process on loopback: HTTP, tritonclient, graceful shutdown."""

from __future__ import annotations

import signal
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
def server(onnx_model):
    process, url = start_server(onnx_model)
    yield url
    stop(process)


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


@pytest.mark.parametrize(
    "body,headers,message",
    [
        ({"inputs": [{"name": "image", "shape": [1, 3, 64, 64], "datatype": "FP32", "data": [0.0] * 12288}]}, {},
         "must have shape [N, 3, 128, 128]"),
        ({"inputs": [{"name": "image", "shape": [1, 3, 128, 128], "datatype": "INT8", "data": [0] * 49152}]}, {},
         "must be FP32"),
        ({"inputs": [{"name": "pixels", "shape": [1, 3, 128, 128], "datatype": "FP32", "data": [0.0]}]}, {},
         "unexpected input 'pixels'"),
        ({"inputs": [{"name": "image", "shape": [1, 3, 128, 128], "datatype": "FP32", "data": [0.0] * 10}]}, {},
         "needs 49152 values, got 10"),
        ({"inputs": [{"name": "image", "shape": [1, 3, 128, 128], "datatype": "FP32",
                      "parameters": {"binary_data_size": 100}}]}, {"binary": b"\x00" * 100},
         "needs 196608 bytes of FP32"),
        ({"outputs": [{"name": "probs"}],
          "inputs": [{"name": "image", "shape": [1, 3, 128, 128], "datatype": "FP32", "data": [0.0] * 49152}]}, {},
         "unknown output 'probs'"),
    ],
)
def test_v2_bad_requests_are_400_in_the_v2_error_format(server, body, headers, message):
    import json

    header = json.dumps(body).encode()
    binary = headers.get("binary", b"")
    response = httpx.post(f"{server}/v2/models/alexnet_acmix/infer", content=header + binary,
                          headers={"Inference-Header-Content-Length": str(len(header))} if binary else {})
    assert response.status_code == 400
    assert message in response.json()["error"]
    assert httpx.get(f"{server}/v2/health/ready").status_code == 200


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
    assert process.wait(timeout=30) in (0, -signal.SIGTERM)
    assert "drained and closed" in process.stdout.read()
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/healthz", timeout=1)
