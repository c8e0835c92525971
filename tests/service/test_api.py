"""The HTTP API in-process (TestClient) over the real ONNX Runtime backend."""

from __future__ import annotations

import io
import re
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from model.calibration import probabilities as softmax
from model.preprocessing import decode_image, preprocess
from model.spec import CLASSES
from tests.conftest import jpeg_bytes, run_onnx
from tests.service.conftest import SlowBackend


def upload(data: bytes, name: str = "image.jpg", field: str = "file"):
    return {field: (name, data, "application/octet-stream")}


def png(size=(32, 32), color=(10, 200, 30), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color if mode == "RGB" else 0).save(buffer, format="PNG")
    return buffer.getvalue()


def spider(size=(200, 200)) -> bytes:
    """A SPIDER file (a format Pillow opens, this model does not take): its 200x200 upload used to
    hang, decoded in a thread whose StopIteration never reached the request."""
    buffer = io.BytesIO()
    Image.new("F", size).save(buffer, format="SPIDER")
    return buffer.getvalue()


def header_only_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (1-bit grey) over a few bytes of image data: what a
    decompression bomb looks like before decoding."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b"")


def test_predict_returns_the_models_answer(client, onnx_model, cifar_like_jpegs):
    data = cifar_like_jpegs[3]
    response = client.post("/predict", files=upload(data), data={"top_k": "3"})
    assert response.status_code == 200, response.text
    body = response.json()
    logits = run_onnx(onnx_model, preprocess(decode_image(data))[None])[0]
    probabilities = softmax(logits.astype(np.float64))
    best = int(np.argmax(logits))
    assert body["class_id"] == best and body["label"] == CLASSES[best]
    assert body["confidence"] == pytest.approx(probabilities[best], rel=1e-4)
    assert [c["class_id"] for c in body["top_k"]] == list(np.argsort(-probabilities)[:3])
    assert body["model"] == "alexnet_acmix" and body["backend"] == "onnxruntime"


def test_top_k_defaults_to_five_and_probabilities_sum_to_one(client, cifar_like_jpegs):
    body = client.post("/predict", files=upload(cifar_like_jpegs[0])).json()
    assert len(body["top_k"]) == 5
    full = client.post("/predict", files=upload(cifar_like_jpegs[0]), data={"top_k": 10}).json()
    assert sum(c["probability"] for c in full["top_k"]) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("fmt,mode", [("PNG", "RGBA"), ("GIF", "P"), ("BMP", "L"), ("WEBP", "RGB")])
def test_formats_and_modes_are_accepted(client, fmt, mode):
    buffer = io.BytesIO()
    Image.new("RGB", (40, 24), (120, 50, 200)).convert(mode).save(buffer, format=fmt)
    assert client.post("/predict", files=upload(buffer.getvalue(), f"x.{fmt.lower()}")).status_code == 200


def test_batch_gives_one_result_per_file_in_order_and_isolates_bad_files(client, cifar_like_jpegs):
    files = [("file", ("a.jpg", cifar_like_jpegs[0], "image/jpeg")),
             ("file", ("bad.txt", b"definitely not an image", "text/plain")),
             ("file", ("c.jpg", cifar_like_jpegs[5], "image/jpeg"))]
    response = client.post("/predict/batch", files=files)
    assert response.status_code == 200
    results = response.json()["results"]
    assert [r["filename"] for r in results] == ["a.jpg", "bad.txt", "c.jpg"]
    assert results[1]["status"] == 400 and "not a recognized image format" in results[1]["error"]
    for i, index in ((0, 0), (2, 5)):
        single = client.post("/predict", files=upload(cifar_like_jpegs[index])).json()
        assert results[i]["prediction"]["class_id"] == single["class_id"]
        assert results[i]["prediction"]["confidence"] == pytest.approx(single["confidence"], rel=1e-5)


def test_a_batch_of_more_files_than_the_queue_holds_is_refused_whole(make_client, cifar_like_jpegs):
    """1,000 files to an idle server with a queue of 512 came back 200 with 488 results of 429."""
    client = make_client(max_queue_size=4)
    files = [("file", (f"{i}.jpg", cifar_like_jpegs[0], "image/jpeg")) for i in range(5)]
    response = client.post("/predict/batch", files=files)
    assert response.status_code == 400 and response.json()["detail"] == "5 images exceed the queue size 4"
    assert client.post("/predict/batch", files=files[:4]).status_code == 200


def test_a_batch_whose_every_file_was_shed_is_a_429_with_retry_after(make_client, cifar_like_jpegs, monkeypatch):
    """It was a 200 whose every result said 429, without Retry-After, logged and counted as a success.
    A fake queue (the batcher's own logic is tested in test_batching): always full."""
    from service.batching import QueueFullError

    client = make_client()
    state = client.app.state.service

    async def full(images, deadline, tag=None):
        raise QueueFullError("512 requests are already waiting")

    monkeypatch.setattr(state.batcher, "infer_many", full)
    files = [("file", (f"{i}.jpg", cifar_like_jpegs[i], "image/jpeg")) for i in range(3)]
    response = client.post("/predict/batch", files=files)
    assert response.status_code == 429 and int(response.headers["retry-after"]) >= 1
    assert "too many requests waiting" in response.json()["detail"]


def test_a_file_that_fails_unexpectedly_fails_alone_in_its_batch(client, cifar_like_jpegs, monkeypatch):
    """A bug while handling one file (a fake decode raises it) is that file's 500; the others answer."""
    state = client.app.state.service
    decode = state.decode

    async def failing_on_the_second(data, deadline=None):
        if data == cifar_like_jpegs[1]:
            raise RuntimeError("a bug")
        return await decode(data, deadline)

    monkeypatch.setattr(state, "decode", failing_on_the_second)
    files = [("file", (f"{i}.jpg", cifar_like_jpegs[i], "image/jpeg")) for i in range(3)]
    results = client.post("/predict/batch", files=files).json()["results"]
    assert [r["status"] for r in results] == [200, 500, 200]
    assert results[1]["error"] == "internal error: RuntimeError" and results[2]["prediction"]["label"]


@pytest.mark.parametrize(
    "files,data,status,message",
    [
        (upload(b"hello world"), None, 400, "not a recognized image format"),
        (upload(b""), None, 400, "empty file"),
        (upload(spider()), None, 400, "not a recognized image format (this model takes JPEG, PNG, WEBP, BMP, GIF)"),
        (upload(spider((32, 32))), None, 400, "not a recognized image format"),  # was a 500
        (upload(png()[:60]), None, 400, "corrupt or truncated"),
        # cut inside the header: the format's own file, not "a format this model does not take"
        (upload(png()[:33]), None, 400, "corrupt or truncated image: a PNG file whose header cannot be read"),
        (upload(jpeg_bytes(np.zeros((8, 8, 3), np.uint8))[:20]), None, 400, "a JPEG file whose header cannot"),
        (upload(b"GIF89a\x01"), None, 400, "a GIF file whose header cannot be read"),
        (upload(b"RIFF\x10\0\0\0WEBP"), None, 400, "a WEBP file whose header cannot be read"),
        (upload(png(), field="image"), None, 422, "file"),
        (None, None, 422, "file"),
        (upload(png()), {"top_k": "0"}, 422, "top_k"),
        (upload(png()), {"top_k": "11"}, 422, "top_k"),
        (upload(png()), {"top_k": "many"}, 422, "top_k"),
    ],
)
def test_bad_input_is_a_clear_4xx_and_the_server_keeps_serving(client, files, data, status, message):
    response = client.post("/predict", files=files, data=data)
    assert response.status_code == status
    assert message in response.text
    assert client.post("/predict", files=upload(png())).status_code == 200


def test_a_422_names_the_field_and_does_not_echo_what_was_sent(client):
    secret = "a value the client sent, not to come back" * 100
    response = client.post("/predict", files=upload(png()), data={"top_k": secret})
    assert response.status_code == 422 and "top_k" in response.text and "valid integer" in response.text
    assert secret not in response.text and len(response.content) < 1000


@pytest.mark.parametrize("route", ["/predict", "/predict/batch"])
def test_an_image_sent_as_the_body_or_in_a_part_of_another_name_gets_a_422_saying_how_to_send_it(client, route,
                                                                                                cifar_like_jpegs):
    for request in ({"content": cifar_like_jpegs[0], "headers": {"content-type": "image/jpeg"}},
                    {"files": {"image": ("a.jpg", cifar_like_jpegs[0])}}):
        response = client.post(route, **request)
        assert response.status_code == 422
        [error] = response.json()["detail"]
        assert error["loc"] == ["body", "file"] and "multipart/form-data part named `file`" in error["msg"]
        assert ("image/jpeg" if "content" in request else "multipart/form-data") in error["msg"]


def test_16_bit_grey_png_gets_the_answer_of_its_8_bit_image(client, cifar_like_jpegs):
    """It was decoded nearly all white (mode I;16 clipped at 255), answered with a 200."""
    grey = np.asarray(decode_image(cifar_like_jpegs[3]).convert("L"))
    answers = []
    for samples in (grey, grey.astype(np.uint16) * 257):
        buffer = io.BytesIO()
        Image.fromarray(samples).save(buffer, format="PNG")
        response = client.post("/predict", files=upload(buffer.getvalue(), "grey.png"), data={"top_k": "10"})
        assert response.status_code == 200, response.text
        answers.append(response.json())
    assert answers[1]["top_k"] == answers[0]["top_k"]


def test_several_file_parts_to_predict_are_refused(client):
    """Only the last was classified; the others went unanswered."""
    files = [("file", ("a.png", png(color=(250, 0, 0)), "image/png")), ("file", ("b.png", png(), "image/png"))]
    response = client.post("/predict", files=files)
    assert response.status_code == 400
    assert response.json()["detail"] == "several `file` parts: send one file to /predict, or several to /predict/batch"


def test_a_file_part_without_a_filename_is_refused_by_name_without_echoing_it(client):
    """curl -F 'file=<a.png' sends the file as a plain field: FastAPI's 422 said "Expected UploadFile"
    and echoed the whole part back."""
    data = png(size=(64, 64))
    message = "the file part has no filename: send it as a file upload (curl -F file=@image.png)"
    response = client.post("/predict", files={"file": (None, data)})
    assert response.status_code == 400 and response.json() == {"detail": message}
    files = [("file", ("a.png", data, "image/png")), ("file", (None, data))]
    results = client.post("/predict/batch", files=files).json()["results"]
    assert [r["status"] for r in results] == [200, 400]
    assert results[1] == {"filename": None, "prediction": None, "error": message, "status": 400}
    # still documented as the file upload it must be (the docs page offers a file picker)
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    assert schemas["Body_predict_predict_post"]["properties"]["file"]["contentMediaType"] == "application/octet-stream"
    assert "anyOf" not in schemas["Body_predict_batch_predict_batch_post"]["properties"]["file"]["items"]


def test_pixel_limit_and_decompression_bombs(make_client):
    client = make_client(max_image_pixels=100_000)
    big = png(size=(1000, 1000), mode="L")
    response = client.post("/predict", files=upload(big))
    assert response.status_code == 400 and "1000x1000 = 1000000 pixels, over the pixel limit of 100000" in response.text
    # A PNG header claiming 60000x60000 with almost no data is refused before decoding. Pillow itself
    # refuses it first (over twice Image.MAX_IMAGE_PIXELS): the message still cites the configured limit.
    bomb = header_only_png(60000, 60000)
    assert len(bomb) < 1_000
    response = client.post("/predict", files=upload(bomb))
    assert response.status_code == 400
    assert response.json() == {"detail": "file 'image.jpg': image is 3600000000 pixels, over the pixel limit of 100000"}


def test_upload_limit_413(make_client):
    client = make_client(max_upload_bytes=50_000)
    # Refused on Content-Length, in each API's JSON error format (Starlette's own limit answered
    # plain text, which tritonclient cannot read)
    response = client.post("/predict", files=upload(b"\xff" * 60_000))
    assert response.status_code == 413 and response.json() == {"detail": "request body over the upload limit of 50000 bytes"}
    response = client.post("/v2/models/alexnet_acmix/infer", content=b"{" + b" " * 60_000 + b"}",
                           headers={"content-type": "application/json"})
    assert response.status_code == 413 and response.json() == {"error": "request body over the upload limit of 50000 bytes"}

    def chunks():  # no Content-Length: the limit is enforced while reading
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\n'
        for _ in range(20):
            yield b"x" * 10_000

    response = client.post("/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert response.status_code == 413 and response.json() == {"detail": "request body over the upload limit of 50000 bytes"}
    # a request whose body is never read is not refused
    assert client.request("GET", "/healthz", content=b"x" * 60_000).status_code == 200
    assert client.post("/predict", files=upload(png())).status_code == 200


def test_api_key(make_client):
    client = make_client(api_key="s3cret")
    assert client.post("/predict", files=upload(png())).status_code == 401
    assert client.post("/predict", files=upload(png()), headers={"X-API-Key": "wrong"}).status_code == 401
    assert client.post("/predict", files=upload(png()), headers={"X-API-Key": "s3cret"}).status_code == 200
    assert client.post("/predict", files=upload(png()), headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.post("/predict", files=upload(png()), headers={"Authorization": "bearer s3cret"}).status_code == 200
    assert client.post("/predict", files=upload(png()), headers={"Authorization": "s3cret"}).status_code == 401
    assert client.post("/v2/models/alexnet_acmix/infer", json={}).status_code == 401
    assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200
    # The key before the upload: FastAPI parses a form before dependencies run, so a broken or
    # endless upload without a key got 400 / 408, not 401 (and the upload was read for nothing).
    broken = client.post("/predict", content=b"--b\r\nnot a part", headers={"content-type": "multipart/form-data; boundary=b"})
    assert broken.status_code == 401 and broken.headers["www-authenticate"] == "Bearer"
    assert "missing or wrong API key" in broken.json()["detail"]

    def endless():
        yield b"--b\r\n"
        raise AssertionError("the body was read")

    assert client.post("/predict/batch", content=endless(),
                       headers={"content-type": "multipart/form-data; boundary=b"}).status_code == 401
    assert re.search(r'^http_requests_total\{method="POST",route="/predict",status="401"\} [1-9]', client.get("/metrics").text,
                     re.M)


def test_concurrent_requests_form_batches_visible_in_metrics(make_client, cifar_like_jpegs):
    client = make_client(max_queue_delay_ms=50)
    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(lambda d: client.post("/predict", files=upload(d)).status_code,
                                 cifar_like_jpegs * 3))
    assert statuses == [200] * 30
    text = client.get("/metrics").text
    count = float(re.search(r"^batch_size_count (\S+)$", text, re.M).group(1))
    total = float(re.search(r"^batch_size_sum (\S+)$", text, re.M).group(1))
    assert total >= 30 and total / count > 1.0  # warm-up not counted; requests were batched
    assert re.search(r'^http_requests_total\{method="POST",route="/predict",status="200"\} 30\.0$', text, re.M)
    for name in ("http_request_duration_seconds_bucket", "batch_queue_wait_seconds_bucket",
                 "inference_duration_seconds_bucket", "batch_queue_length"):
        assert name in text


def test_backpressure_429_with_retry_after(make_client):
    backend = SlowBackend(max_batch=1, delay=0.3)
    client = make_client(backend=backend, max_batch_size=1, max_queue_size=1, max_queue_delay_ms=0)
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda _: client.post("/predict", files=upload(png())), range(6)))
    codes = sorted(r.status_code for r in responses)
    assert 200 in codes and 429 in codes and set(codes) <= {200, 429}
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.headers["retry-after"] == "1" and "too many requests" in refused.json()["detail"]


def test_deadline_504(make_client):
    backend = SlowBackend(max_batch=1, delay=0.5)
    client = make_client(backend=backend, max_batch_size=1, request_timeout_s=0.2)
    response = client.post("/predict", files=upload(png()))
    assert response.status_code == 504 and "no result before the request's deadline" in response.text


def test_a_request_can_ask_for_a_shorter_deadline_never_a_longer_one(make_client):
    # A fake backend (not the model) that takes 2 s per batch.
    client = make_client(backend=SlowBackend(max_batch=1, delay=2.0), max_batch_size=1, request_timeout_s=10)
    started = time.perf_counter()
    response = client.post("/predict", files=upload(png()), headers={"X-Request-Timeout-Ms": "150"})
    assert response.status_code == 504 and time.perf_counter() - started < 1.5
    assert client.post("/predict", files=upload(png()), headers={"X-Request-Timeout-Ms": "60000"}).status_code == 200
    assert client.post("/predict", files=upload(png()), headers={"X-Request-Timeout-Ms": "-1"}).status_code == 422


def test_health_readiness_labels_and_docs(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["ready"] and ready["backend"] == "onnxruntime" and "ACMIX_BACKEND" in ready["backend_reason"]
    assert ready["precision"] == "fp32"  # named, not only in the served file's name
    assert client.get("/labels").json()["labels"] == list(CLASSES)
    assert client.get("/openapi.json").json()["paths"]["/predict"]
    assert client.get("/docs").status_code == 200
    assert "<form" in client.get("/").text


def test_a_backend_that_fails_to_load_stops_startup(onnx_model, tmp_path):
    from fastapi.testclient import TestClient

    from runtime.backend import BackendError
    from service.main import create_app
    from tests.service.conftest import service_settings

    app = create_app(service_settings(onnx_model, onnx_path=str(tmp_path / "missing.onnx")))
    with pytest.raises(BackendError, match="missing.onnx is missing; `python -m service` makes it"), TestClient(app):
        pass
    assert app.state.service.startup_error.startswith(f"{tmp_path / 'missing.onnx'} is missing")
    assert app.state.service.decode_pool is None  # nothing started for a backend that never loaded


def test_an_onnx_recording_a_temperature_that_is_not_a_positive_number_stops_startup_in_one_line(
        onnx_model, tmp_path):
    """It raised ValueError, which the lifespan did not take for a refusal: a traceback, and several
    workers each started again."""
    import shutil

    import onnx
    from fastapi.testclient import TestClient

    from runtime.backend import BackendError
    from runtime.reference import reference_path
    from service.main import create_app
    from tests.service.conftest import service_settings

    model = onnx.load(str(onnx_model))
    model.metadata_props.add(key="temperature", value="-1")
    bad = tmp_path / "bad.onnx"
    onnx.save(model, str(bad))
    shutil.copyfile(reference_path(onnx_model), reference_path(bad))
    app = create_app(service_settings(onnx_model, onnx_path=str(bad)))
    with pytest.raises(BackendError, match="temperature '-1' in its metadata is not a positive number"), TestClient(app):
        pass
    assert app.state.service.startup_error.startswith(f"{bad}: temperature '-1'")
    assert app.state.service.decode_pool is None


def test_an_unreadable_reference_file_stops_startup_in_one_line(onnx_model, tmp_path):
    import shutil

    from fastapi.testclient import TestClient

    from runtime.backend import BackendError
    from runtime.reference import reference_path
    from service.main import create_app
    from tests.service.conftest import service_settings

    onnx = shutil.copyfile(onnx_model, tmp_path / "m.onnx")
    reference_path(onnx).write_text("{truncated")
    app = create_app(service_settings(onnx_model, onnx_path=str(onnx)))
    with pytest.raises(BackendError, match="m.onnx.reference.json"), TestClient(app):
        pass
    assert app.state.service.startup_error is not None


def test_confidence_and_probabilities_use_the_temperature_the_onnx_records(make_client, onnx_model, tmp_path,
                                                                            cifar_like_jpegs):
    import shutil

    import onnx

    from runtime.reference import reference_path

    model = onnx.load(str(onnx_model))
    model.metadata_props.add(key="temperature", value="2.5")
    calibrated = tmp_path / "calibrated.onnx"
    onnx.save(model, str(calibrated))
    shutil.copyfile(reference_path(onnx_model), reference_path(calibrated))
    client = make_client(onnx_path=str(calibrated))
    data = cifar_like_jpegs[2]
    body = client.post("/predict", files=upload(data), data={"top_k": "10"}).json()
    logits = run_onnx(onnx_model, preprocess(decode_image(data))[None])[0]
    expected = softmax(logits / 2.5)
    assert body["confidence"] == pytest.approx(expected.max(), rel=1e-4)
    assert [c["probability"] for c in body["top_k"]] == pytest.approx(sorted(expected, reverse=True), rel=1e-4)
    assert body["confidence"] < softmax(logits).max()  # T > 1 softens an over-confident softmax
    # /v2 still returns the raw logits.
    v2 = client.post("/v2/models/alexnet_acmix/infer", json={"inputs": [{
        "name": "image", "datatype": "FP32", "shape": [1, 3, 128, 128],
        "data": preprocess(decode_image(data)).reshape(-1).tolist()}]}).json()
    np.testing.assert_allclose(v2["outputs"][0]["data"], logits, rtol=1e-4, atol=1e-4)


def test_the_logged_route_is_the_path_as_sent_each_unprintable_byte_escaped():
    from service.request_log import logged_path

    assert logged_path({"raw_path": b"/v2/models/x%0Ay", "path": "/v2/models/x\ny"}) == "/v2/models/x%0Ay"
    assert logged_path({"raw_path": b"/caf\xe9 x\n", "path": "unused"}) == "/caf%E9%20x%0A"  # one escape per byte
    assert logged_path({"path": "/caf\u00e9\n"}) == "/caf%C3%A9%0A"  # no raw path: the path's UTF-8 bytes


def test_closing_releases_the_backend_and_the_decode_pool_even_when_the_batcher_fails_to_close(onnx_model):
    """Fakes (not the service's parts): a batcher whose close raises, as a crashed batching task
    re-raises in it, and a backend that records its close."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from service.main import close_service
    from service.metrics import Metrics
    from service.state import ServiceState
    from tests.service.conftest import service_settings

    class FailingBatcher:
        async def close(self):
            raise RuntimeError("the batching task crashed")

    class Backend:
        closed = False

        def close(self):
            self.closed = True

    state = ServiceState(settings=service_settings(onnx_model), metrics=Metrics())
    state.batcher, state.backend = FailingBatcher(), Backend()
    state.decode_pool = ThreadPoolExecutor(1)
    with pytest.raises(RuntimeError, match="the batching task crashed"):
        asyncio.run(close_service(state))
    assert state.backend.closed and state.decode_pool._shutdown
    assert state.draining and not state.ready


@pytest.mark.parametrize("source, warned", [("generated noise images", True),
                                            ("validation images of cifar10-train-png.tar.gz", False)])
def test_the_start_says_which_reference_images_checked_it_and_warns_of_noise(make_client, onnx_model, tmp_path,
                                                                           caplog, source, warned):
    """An ONNX exported without the data set (a clone away from ../shared/data) is checked at start on
    noise images only: it said nothing of it."""
    import json
    import logging
    import shutil

    from runtime.reference import reference_path

    onnx = shutil.copyfile(onnx_model, tmp_path / "m.onnx")
    record = json.loads(reference_path(onnx_model).read_text())
    reference_path(onnx).write_text(json.dumps({**record, "source": source}))
    with caplog.at_level(logging.INFO, logger="service"):
        make_client(onnx_path=str(onnx))
    lines = [r.getMessage() for r in caplog.records if r.name == "service"]
    assert any(line.startswith(f"reference check passed: {len(record['logits'])} {source}") for line in lines)
    assert any("the reference images are generated noise" in line for line in lines) == warned


def test_acmix_data_dir_says_where_the_shared_data_is():
    import os
    import subprocess
    import sys

    from harness.server import ROOT

    code = "from model import paths; print(paths.DATA); print(paths.JPEG_DATA)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                          env={**os.environ, "ACMIX_DATA_DIR": "/data/cifar"})
    assert done.stdout.split() == ["/data/cifar/cifar10-train-png.tar.gz", "/data/cifar/cifar10-train-jpeg.tar.gz"]


def test_a_worker_of_several_whose_backend_hangs_exits_for_the_supervisor_to_replace_it(onnx_model):
    """It cannot drain (its executor thread never returns) and nothing outside restarts one worker of
    several. The service's state over a fake batcher (one batch stuck in the backend) and a fake exit."""
    import asyncio
    import time

    from service.batching import InBackend
    from service.main import exit_when_hung
    from service.metrics import Metrics
    from service.state import ServiceState
    from tests.service.conftest import service_settings

    class Batcher:
        in_backend = InBackend()

    state = ServiceState(settings=service_settings(onnx_model, request_timeout_s=0.1), metrics=Metrics())
    state.batcher, exits = Batcher(), []

    async def watch():
        watchdog = asyncio.create_task(exit_when_hung(state, interval_s=0.05, exit=exits.append))
        await asyncio.sleep(0.2)
        assert exits == []  # no batch in the backend
        with state.batcher.in_backend.batch(time.perf_counter()):  # one goes in, and stays
            await asyncio.sleep(0.4)
        watchdog.cancel()

    asyncio.run(watch())
    assert exits and exits[0] == 1


@pytest.mark.parametrize("timeout_ms", ["5e-324", "2.2250738585072014e-308", "1e-300", "0.0001"])
def test_a_request_timeout_below_a_microsecond_is_refused_naming_the_header_and_its_minimum(client, timeout_ms):
    response = client.post("/predict", files=upload(png()), headers={"X-Request-Timeout-Ms": timeout_ms})
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["loc"] == ["header", "X-Request-Timeout-Ms"] and "0.001" in error["msg"]
