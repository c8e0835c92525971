"""In-process (TestClient) over the real model: the image model over v2, the published preprocessing
contract, request identity, CORS, malformed bodies, and readiness that stays honest."""

from __future__ import annotations

import base64
import json
import logging
import shutil
import time

import numpy as np
import pytest

from model.preprocessing import decode_image, preprocess
from runtime.backend import BackendError
from runtime.reference import reference_path
from tests.conftest import run_onnx
from tests.service.conftest import SlowBackend

INFER = "/v2/models/alexnet_acmix/infer"
INFER_IMAGE = "/v2/models/alexnet_acmix_image/infer"


def tensor_body(batch: np.ndarray) -> dict:
    return {"inputs": [{"name": "image", "datatype": "FP32", "shape": list(batch.shape),
                        "data": batch.reshape(-1).tolist()}]}


def test_the_image_model_takes_base64_files_in_json_and_names_a_bad_element(client, onnx_model, cifar_like_jpegs):
    files = cifar_like_jpegs[:3]
    body = {"id": "x1", "inputs": [{"name": "image", "datatype": "BYTES", "shape": [3],
                                    "data": [base64.b64encode(f).decode() for f in files]}]}
    response = client.post(INFER_IMAGE, json=body)
    assert response.status_code == 200, response.text
    expected = run_onnx(onnx_model, np.stack([preprocess(decode_image(f)) for f in files]))
    out = response.json()
    assert out["id"] == "x1" and out["model_name"] == "alexnet_acmix_image"
    np.testing.assert_allclose(np.array(out["outputs"][0]["data"]).reshape(3, 10), expected, rtol=1e-4, atol=1e-4)
    body["inputs"][0]["data"][1] = base64.b64encode(b"GIF89a broken").decode()
    response = client.post(INFER_IMAGE, json=body)
    assert response.status_code == 400 and "element 1:" in response.json()["error"]
    body["inputs"][0]["data"][1] = "***"
    assert "element 1: not valid base64" in client.post(INFER_IMAGE, json=body).json()["error"]


def test_the_image_model_takes_shape_n_1_as_its_config_describes_it_and_refuses_shared_memory_inputs(
        client, onnx_model, cifar_like_jpegs):
    """Its config says dims [1] reshaped to [] (Triton's form for one element per image): a client
    reading the config sends [N, 1], one reading the metadata [N]; both are taken."""
    config = client.get("/v2/models/alexnet_acmix_image/config").json()
    assert config["input"][0]["dims"] == [1] and config["input"][0]["reshape"] == {"shape": []}
    files = cifar_like_jpegs[:2]
    data = [base64.b64encode(f).decode() for f in files]
    expected = run_onnx(onnx_model, np.stack([preprocess(decode_image(f)) for f in files]))
    for shape, elements in (([2], data), ([2, 1], data), ([2, 1], [[d] for d in data])):  # flat or nested JSON
        body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": shape, "data": elements}]}
        response = client.post(INFER_IMAGE, json=body)
        assert response.status_code == 200, response.text
        np.testing.assert_allclose(np.array(response.json()["outputs"][0]["data"]).reshape(2, 10), expected,
                                   rtol=1e-4, atol=1e-4)
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2, 2], "data": data * 2}]}
    assert "must have shape [N] or [N, 1]" in client.post(INFER_IMAGE, json=body).json()["error"]
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2],
                        "parameters": {"shared_memory_region": "in", "shared_memory_byte_size": 100}}]}
    response = client.post(INFER_IMAGE, json=body)
    assert response.status_code == 400
    assert "input 'image' names shared memory region 'in'" in response.json()["error"]


def test_the_preprocessing_contract_is_published_in_metadata_and_config(client):
    metadata = client.get("/v2/models/alexnet_acmix").json()
    assert metadata["parameters"]["preprocessing_std"] == "0.229,0.224,0.225"
    assert metadata["parameters"]["preprocessing_resampling"].startswith("bilinear")
    config = client.get("/v2/models/alexnet_acmix/config").json()
    assert config["parameters"]["preprocessing_channel_order"] == {"string_value": "RGB"}
    assert config["input"][0] == {"name": "image", "data_type": "TYPE_FP32", "dims": [3, 128, 128]}
    image = client.get("/v2/models/alexnet_acmix_image").json()
    assert image["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]


def test_a_client_following_the_published_contract_alone_makes_the_tensor_the_service_makes(client,
                                                                                          cifar_like_jpegs):
    """The contract is written from the preprocessing's own values: a client that reads only the
    metadata (size, resampling, scale, mean, std, layout) reproduces model/preprocessing.py."""
    from PIL import Image

    published = {key.removeprefix("preprocessing_"): value
                 for key, value in client.get("/v2/models/alexnet_acmix").json()["parameters"].items()
                 if key.startswith("preprocessing_")}
    width, height = (int(v) for v in published["input_size"].split("x"))
    resample = Image.Resampling[published["resampling"].split()[0].upper()]
    mean, std = (np.array([float(v) for v in published[k].split(",")], np.float32) for k in ("mean", "std"))
    assert published["channel_order"] == "RGB" and published["layout"] == "NCHW"
    for data in cifar_like_jpegs[:3]:
        rgb = decode_image(data).resize((width, height), resample)
        mine = ((np.asarray(rgb, np.float32) / 255 - mean) / std).transpose(2, 0, 1)
        np.testing.assert_allclose(mine, preprocess(decode_image(data)), atol=1e-5)


def test_raw_pixels_are_refused_with_how_to_preprocess(client, cifar_like_jpegs):
    raw = np.asarray(decode_image(cifar_like_jpegs[0]).resize((128, 128)), np.float32).transpose(2, 0, 1)[None]
    response = client.post(INFER, json=tensor_body(raw))
    assert response.status_code == 400
    message = response.json()["error"]
    assert "not a preprocessed image" in message and "(value / 255 - mean) / std" in message
    assert "alexnet_acmix_image" in message


def test_real_preprocessed_validation_images_are_never_refused(shared_data):
    from model.data import open_dataset
    from service.inference import check_preprocessed

    images = open_dataset(shared_data, split="val", val_split="model/weights/val_split.json")
    for start in range(0, len(images), 500):
        check_preprocessed(np.stack([preprocess(image) for image in images.images[start : start + 500]]), "m")
    # Edge cases too: all black, all white, every channel at its extreme.
    extremes = [np.full((32, 32, 3), v, np.uint8) for v in (0, 255)] + [np.eye(32, dtype=np.uint8)[..., None] * 255
                                                                       * np.ones(3, np.uint8)]
    check_preprocessed(np.stack([preprocess(image) for image in extremes]), "m")


@pytest.mark.parametrize("body, message", [
    (b"[" * 100_000 + b"]" * 100_000, "nests arrays or objects too deeply"),
    (json.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 3, 128, 128],
                             "data": [float("nan")] * 49152}]}).encode(), "NaN: JSON numbers must be finite"),
    (json.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 3, 128, 128],
                             "data": [1e39] * 49152}]}).encode(), "beyond FP32"),  # float32 overflow: inf, and the message says why
    (b'{"inputs": [', "is not valid JSON"),
    (b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 3, 128, 128], "data": [[[["a"]]]]}]}',
     "data must be JSON numbers; it holds strings"),
])
def test_malformed_bodies_are_400_and_the_server_keeps_serving(client, body, message):
    response = client.post(INFER, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and message in response.json()["error"]
    assert client.get("/v2/health/ready").status_code == 200


@pytest.mark.parametrize("outputs, parameters, message", [
    ([{"name": "probabilities"}], {}, "unknown output 'probabilities'"),
    ([{"name": "logits"}, {"name": "logits"}], {}, "output 'logits' is requested 2 times; request it once"),
    ([{"name": "logits", "parameters": {"classification": 11}}], {}, "classification must be an integer in 0..10"),
    ([{"name": "logits", "parameters": {"binary_data": "false"}}], {}, "parameter binary_data must be true or false"),
    (None, {"binary_data_output": "false"}, "parameter binary_data_output must be true or false"),
    # Triton's shared-memory extensions are not offered: ignored, the logits came back in the body
    ([{"name": "logits", "parameters": {"shared_memory_region": "out", "shared_memory_byte_size": 40}}], {},
     "output 'logits' names shared memory region 'out': the shared-memory extensions are not supported"),
])
def test_a_bad_output_request_is_refused_before_inference(make_client, outputs, parameters, message):
    # A fake backend (not the model), to count what reaches it.
    backend = SlowBackend()
    client = make_client(backend=backend)
    before = len(backend.calls)
    body = {**tensor_body(np.zeros((1, 3, 128, 128), np.float32)), "parameters": parameters}
    if outputs:
        body["outputs"] = outputs
    response = client.post(INFER, json=body)
    assert response.status_code == 400 and message in response.json()["error"]
    assert len(backend.calls) == before


def test_binary_data_that_no_input_claims_is_refused(client):
    text = json.dumps(tensor_body(np.zeros((1, 3, 128, 128), np.float32))).encode()
    response = client.post(INFER, content=text + b"\0" * 16, headers={"Inference-Header-Content-Length": str(len(text))})
    assert response.status_code == 400 and "16 bytes of binary data after the JSON header" in response.json()["error"]


def test_request_ids_are_echoed_generated_and_logged_with_timings(client, cifar_like_jpegs, caplog):
    with caplog.at_level(logging.INFO, logger="service.requests"):
        given = client.post("/predict", files={"file": ("a.jpg", cifar_like_jpegs[0], "image/jpeg")},
                            headers={"X-Request-ID": "client-7",
                                     "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"})
        generated = client.get("/labels")
        bad = client.get("/labels", headers={"X-Request-ID": "has spaces and ; semicolons"})
    assert given.headers["x-request-id"] == "client-7"
    assert len(generated.headers["x-request-id"]) == 32 and bad.headers["x-request-id"] != "has spaces and ; semicolons"
    (line,) = [r.getMessage() for r in caplog.records if "id=client-7" in r.getMessage()]
    assert "route=POST /predict status=200" in line and "queue_ms=" in line and "infer_ms=" in line
    assert "traceparent=00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01" in line
    ready = client.get("/readyz").json()
    assert given.headers["x-model-digest"] == ready["model_digest"][:12] and len(ready["model_digest"]) == 64


def test_cors_preflight_allows_the_api_key_header(make_client):
    client = make_client(cors_origins="https://app.example")
    response = client.options("/predict", headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                                                   "Access-Control-Request-Headers": "x-api-key"})
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "https://app.example"
    assert "x-api-key" in response.headers["access-control-allow-headers"].lower()
    other = client.options("/predict", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in other.headers
    assert "access-control-allow-origin" not in make_client().get("/labels", headers={"Origin": "https://app.example"}).headers


def test_readiness_needs_the_reference_logits_reproduced(make_client, onnx_model, tmp_path):
    onnx = shutil.copyfile(onnx_model, tmp_path / "m.onnx")
    record = json.loads(reference_path(onnx_model).read_text())
    record["logits"] = [[value + (3.0 if i == 0 else 0.0) for i, value in enumerate(row)] for row in record["logits"]]
    reference_path(onnx).write_text(json.dumps(record))  # as if the artifact or the preprocessing were wrong
    with pytest.raises(BackendError, match="reference check failed"):
        make_client(onnx_path=str(onnx))


def test_a_batch_that_hangs_in_the_backend_turns_liveness_and_readiness_off_until_it_returns(make_client,
                                                                                             cifar_like_jpegs):
    """A backend that never returns fails no batch: its requests got 504s and /healthz said 200 for
    ever. A fake backend (not the model): a batch of 2.5 s against a request timeout of 0.25 s."""
    import threading

    def health_until(status: int, seconds: float) -> int:
        deadline = time.monotonic() + seconds
        while (code := client.get("/healthz").status_code) != status and time.monotonic() < deadline:
            time.sleep(0.05)
        return code

    backend = SlowBackend(max_batch=1)
    client = make_client(backend=backend, max_batch_size=1, request_timeout_s=0.25, max_queue_delay_ms=1)
    backend.delay = 2.5
    upload = {"file": ("a.jpg", cifar_like_jpegs[0], "image/jpeg")}
    answers = []
    waiting = threading.Thread(target=lambda: answers.append(client.post("/predict", files=upload).status_code))
    waiting.start()
    assert health_until(503, 2.0) == 503 and client.get("/readyz").status_code == 503
    assert "the backend hangs" in client.get("/readyz").json()["error"]
    waiting.join(5)
    assert answers == [504]
    assert health_until(200, 4.0) == 200 and client.get("/readyz").status_code == 200  # the batch returned


def test_consecutive_failed_batches_turn_readiness_and_liveness_off_until_one_succeeds(make_client, cifar_like_jpegs):
    backend = SlowBackend()  # a fake backend that fails on command (not the model)
    client = make_client(backend=backend, max_consecutive_failures=3, max_batch_size=1)
    backend.fail = True
    upload = {"file": ("a.jpg", cifar_like_jpegs[0], "image/jpeg")}
    for _ in range(3):
        assert client.get("/healthz").status_code == 200
        response = client.post("/predict", files=upload)
        assert response.status_code == 500 and "inference failed" in response.json()["detail"]
    assert client.get("/healthz").status_code == 503 and client.get("/readyz").status_code == 503
    assert "3 batches failed in a row" in client.get("/readyz").json()["error"]
    live = client.get("/v2/health/live")
    assert live.status_code == 503 and "3 batches failed in a row" in live.json()["error"]  # v2's error object
    backend.fail = False
    # Requests are still taken (a load balancer has stopped sending them; direct ones may come):
    # one good batch resets the count, before the orchestrator acts on liveness.
    assert client.post("/predict", files=upload).status_code == 200
    assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200


def test_v2_health_says_why_it_is_not_ready_in_the_error_object(client):
    # KServe's SDK (InferenceRESTClient.is_server_ready) raises on a 503 with the body's "error" as its
    # message, and shows any other body as a dict ("{'ready': False}, '503 ...'"); KServe's own server
    # answers {"error": ...}. "ready" stays for clients that read it; the status alone is the answer.
    state = client.app.state.service
    state.draining = True
    try:
        for path in ("/v2/health/ready", "/v2/models/alexnet_acmix/ready", "/v2/models/alexnet_acmix_image/ready"):
            response = client.get(path)
            assert response.status_code == 503 and response.headers["content-type"] == "application/json"
            assert response.json() == {"ready": False, "error": "draining"}
    finally:
        state.draining = False
    assert client.get("/v2/health/ready").json() == {"ready": True}
