"""The KServe v2 gRPC API: tritonclient.grpc unchanged, typed contents, every status code, drain."""

from __future__ import annotations

import io
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from PIL import Image

from harness.server import free_port
from model.preprocessing import decode_image, preprocess
from model.spec import CLASSES
from service.kserve_grpc.proto import kserve_v2_pb2 as pb
from tests.conftest import run_onnx
from tests.service.conftest import SlowBackend


@pytest.fixture
def grpc_client(make_client):
    """make(**settings, backend=None) -> (TestClient, tritonclient.grpc client, channel address)."""
    made = []

    def make(backend=None, **settings):
        port = free_port()
        client = make_client(backend=backend, grpc_port=port, **settings)
        address = f"127.0.0.1:{port}"
        made.append(triton.InferenceServerClient(address))
        return client, made[-1], address

    yield make
    for client in made:
        client.close()


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def tensor_input(batch: np.ndarray) -> triton.InferInput:
    tensor = triton.InferInput("image", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch)
    return tensor


def bytes_input(files: list[bytes]) -> triton.InferInput:
    tensor = triton.InferInput("image", [len(files)], "BYTES")
    tensor.set_data_from_numpy(np.array(files, dtype=object))
    return tensor


def status_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(triton.InferenceServerException) as caught:
        call()
    return code_named(caught.value.status()), caught.value.message()


def code_named(status: str) -> grpc.StatusCode:
    """tritonclient reports the status code as text, "StatusCode.NOT_FOUND"."""
    return getattr(grpc.StatusCode, status.removeprefix("StatusCode."))


def test_the_messages_are_the_protocols_field_for_field():
    """Our messages against tritonclient's (generated from Triton's .proto): same numbers, types, names."""
    from tritonclient.grpc import model_config_pb2, service_pb2

    def fields(descriptor):
        return {f.name: (f.number, f.type, f.is_repeated, fields(f.message_type) if f.message_type else None)
                for f in descriptor.fields}

    def within(ours, theirs, where):
        for name, (number, kind, repeated, nested) in ours.items():
            assert name in theirs, f"{where}.{name} is not in the protocol"
            assert theirs[name][:3] == (number, kind, repeated), f"{where}.{name}"
            if nested is not None:
                within(nested, theirs[name][3], f"{where}.{name}")

    for name, message in pb.DESCRIPTOR.message_types_by_name.items():
        source = service_pb2 if name in service_pb2.DESCRIPTOR.message_types_by_name else model_config_pb2
        within(fields(message), fields(source.DESCRIPTOR.message_types_by_name[name]), name)
    ours = {v.name: v.number for v in pb.DESCRIPTOR.enum_types_by_name["DataType"].values}
    assert ours == {v.name: v.number for v in model_config_pb2.DESCRIPTOR.enum_types_by_name["DataType"].values}


def test_tritonclient_grpc_health_metadata_and_config(grpc_client):
    _, client, _ = grpc_client()
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("alexnet_acmix") and client.is_model_ready("alexnet_acmix_image")
    assert list(client.get_server_metadata().extensions) == ["binary_tensor_data", "classification"]
    metadata = client.get_model_metadata("alexnet_acmix")
    assert (metadata.inputs[0].name, metadata.inputs[0].datatype, list(metadata.inputs[0].shape)) == (
        "image", "FP32", [-1, 3, 128, 128])
    image = client.get_model_metadata("alexnet_acmix_image")
    assert (image.inputs[0].datatype, list(image.inputs[0].shape)) == ("BYTES", [-1])
    config = client.get_model_config("alexnet_acmix").config
    assert config.max_batch_size == 8 and config.input[0].name == "image" and list(config.output[0].dims) == [10]
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    assert parameters["preprocessing_mean"] == "0.485,0.456,0.406" and parameters["preprocessing_layout"] == "NCHW"
    assert parameters["labels"] == ",".join(CLASSES)


def test_infer_raw_tensors_images_and_classification(grpc_client, onnx_model, cifar_like_jpegs):
    _, client, _ = grpc_client()
    batch = np.stack([preprocess(decode_image(data)) for data in cifar_like_jpegs[:4]])
    expected = run_onnx(onnx_model, batch)
    result = client.infer("alexnet_acmix", [tensor_input(batch)], request_id="req-7")
    np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=1e-4, atol=1e-4)
    assert result.get_response().id == "req-7"
    result = client.infer("alexnet_acmix_image", [bytes_input(cifar_like_jpegs[:4])])
    np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=1e-4, atol=1e-4)
    top = client.infer("alexnet_acmix", [tensor_input(batch)],
                       outputs=[triton.InferRequestedOutput("logits", class_count=2)]).as_numpy("logits")
    assert top.shape == (4, 2)
    assert [int(entry.decode().split(":")[1]) for entry in top[:, 0]] == expected.argmax(1).tolist()


def raw_call(address: str, request, metadata=()):
    """ModelInfer with our own messages (typed `contents`, which tritonclient never sends)."""
    with grpc.insecure_channel(address) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                    request_serializer=pb.ModelInferRequest.SerializeToString,
                                    response_deserializer=pb.ModelInferResponse.FromString)
        return infer.with_call(request, metadata=metadata, timeout=30)


def test_infer_typed_contents_and_trailing_metadata(grpc_client, onnx_model, cifar_like_jpegs):
    _, _, address = grpc_client()
    batch = np.stack([preprocess(decode_image(data)) for data in cifar_like_jpegs[:2]])
    request = pb.ModelInferRequest(model_name="alexnet_acmix", id="typed")
    request.inputs.add(name="image", datatype="FP32", shape=list(batch.shape)).contents.fp32_contents.extend(
        batch.reshape(-1).tolist())
    response, call = raw_call(address, request, metadata=(("x-request-id", "trace-42"),))
    logits = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(2, 10)
    np.testing.assert_allclose(logits, run_onnx(onnx_model, batch), rtol=1e-4, atol=1e-4)
    trailing = dict(call.trailing_metadata())
    assert trailing["x-request-id"] == "trace-42" and len(trailing["x-model-digest"]) == 12
    images = pb.ModelInferRequest(model_name="alexnet_acmix_image")
    images.inputs.add(name="image", datatype="BYTES", shape=[2]).contents.bytes_contents.extend(cifar_like_jpegs[:2])
    response, _ = raw_call(address, images)
    np.testing.assert_allclose(np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(2, 10), logits,
                               rtol=1e-4, atol=1e-4)


def test_invalid_argument_not_found_and_the_message_names_the_cause(grpc_client, cifar_like_jpegs):
    _, client, _ = grpc_client()
    good = np.zeros((1, 3, 128, 128), np.float32)
    cases = [
        (lambda: client.infer("alexnet_acmix", [bytes_input([b"x"])]), grpc.StatusCode.INVALID_ARGUMENT,
         "must be FP32"),
        (lambda: client.infer("alexnet_acmix", [tensor_input(good * 0 + 200)]), grpc.StatusCode.INVALID_ARGUMENT,
         "not a preprocessed image"),
        (lambda: client.infer("alexnet_acmix", [tensor_input(good * np.nan)]), grpc.StatusCode.INVALID_ARGUMENT,
         "NaN or infinite"),
        (lambda: client.infer("alexnet_acmix_image", [bytes_input([cifar_like_jpegs[0], b"not an image"])]),
         grpc.StatusCode.INVALID_ARGUMENT, "element 1: not a recognized image format"),
        (lambda: client.infer("resnet", [tensor_input(good)]), grpc.StatusCode.NOT_FOUND, "unknown model 'resnet'"),
        (lambda: client.infer("alexnet_acmix", [tensor_input(good)], model_version="2"), grpc.StatusCode.NOT_FOUND,
         "unknown version '2'"),
        (lambda: client.get_model_metadata("resnet"), grpc.StatusCode.NOT_FOUND, "unknown model"),
        (lambda: client.infer("alexnet_acmix", [tensor_input(good)],
                              outputs=[triton.InferRequestedOutput("logits"), triton.InferRequestedOutput("logits")]),
         grpc.StatusCode.INVALID_ARGUMENT, "output 'logits' is requested 2 times"),
    ]
    for call, code, message in cases:
        got, text = status_of(call)
        assert got == code and message in text, (code, text)
    assert client.is_server_ready()  # nothing of that broke the server


def test_an_error_naming_a_huge_value_keeps_its_code_and_cause(grpc_client):
    """A status's message travels in the trailers, where clients refuse more than 16 KiB (8 KiB by chance)
    with their own RESOURCE_EXHAUSTED about metadata: a message echoing what the request sent is clipped."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    _, _, address = grpc_client()
    batch = np.zeros((1, 3, 128, 128), np.float32)
    unknown_model = raw_request(batch)
    unknown_model.model_name = "m" * 100_000
    many_dims = raw_request(batch)
    many_dims.inputs[0].shape[:] = [1] * 100_000
    with grpc.insecure_channel(address) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                    request_serializer=pb.ModelInferRequest.SerializeToString)
        metadata = channel.unary_unary("/inference.GRPCInferenceService/ModelMetadata",
                                       request_serializer=pb.ModelMetadataRequest.SerializeToString)
        health = health_pb2_grpc.HealthStub(channel)
        cases = [
            (lambda: infer(unknown_model, timeout=30), grpc.StatusCode.NOT_FOUND, "unknown model 'mmm"),
            (lambda: infer(many_dims, timeout=30), grpc.StatusCode.INVALID_ARGUMENT, "input 'image' must have shape [N, 3, 128, 128]"),
            (lambda: metadata(pb.ModelMetadataRequest(name="\u00e9\U0001f600" * 20_000), timeout=30),
             grpc.StatusCode.NOT_FOUND, "unknown model '\u00e9\U0001f600"),
            (lambda: health.Check(health_pb2.HealthCheckRequest(service="z" * 100_000), timeout=30),
             grpc.StatusCode.NOT_FOUND, "unknown service 'zzz"),
        ]
        for call, code, cause in cases:
            with pytest.raises(grpc.RpcError) as caught:
                call()
            assert caught.value.code() == code, caught.value.details()[:200]
            assert caught.value.details().startswith(cause) and "characters left out" in caught.value.details()
        assert "this server serves 'alexnet_acmix'" in status_of_raw(lambda: infer(unknown_model, timeout=30))


def test_a_parameter_of_another_type_or_without_a_value_is_named_as_sent(grpc_client):
    """A region sent as an integer was named region ''; a timeout without a value "got None"."""
    _, _, address = grpc_client()
    region = raw_request(np.zeros((1, 3, 128, 128), np.float32))
    region.inputs[0].parameters["shared_memory_region"].int64_param = 3
    timeout = raw_request(np.zeros((1, 3, 128, 128), np.float32))
    timeout.parameters["timeout"].SetInParent()
    with grpc.insecure_channel(address) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                    request_serializer=pb.ModelInferRequest.SerializeToString)
        assert "names shared memory region 3:" in status_of_raw(lambda: infer(region, timeout=30))
        assert status_of_raw(lambda: infer(timeout, timeout=30)).endswith("got a parameter without a value")


def status_of_raw(call) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.details()


def test_unauthenticated_without_the_api_key(grpc_client):
    _, client, _ = grpc_client(api_key="secret")
    batch = np.zeros((1, 3, 128, 128), np.float32)
    code, message = status_of(lambda: client.infer("alexnet_acmix", [tensor_input(batch)]))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "API key" in message
    assert client.infer("alexnet_acmix", [tensor_input(batch)], headers={"x-api-key": "secret"}).as_numpy("logits").shape == (1, 10)
    # without the key, not even whether a model exists (as HTTP answers 401 first)
    code, _ = status_of(lambda: client.infer("resnet", [tensor_input(batch)]))
    assert code == grpc.StatusCode.UNAUTHENTICATED


def test_messages_over_the_upload_limit_are_resource_exhausted(grpc_client):
    _, client, _ = grpc_client(max_upload_bytes=100_000)
    code, _ = status_of(lambda: client.infer("alexnet_acmix", [tensor_input(np.zeros((2, 3, 128, 128), np.float32))]))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_full_queue_is_unavailable_as_triton_answers_it_and_a_passed_deadline_deadline_exceeded(grpc_client):
    # A fake backend (not the model): slow, to fill the queue and to outlast deadlines.
    _, client, _ = grpc_client(backend=SlowBackend(delay=0.5), max_queue_size=2, max_batch_size=1)
    batch = np.zeros((1, 3, 128, 128), np.float32)

    def infer(_):
        try:
            client.infer("alexnet_acmix", [tensor_input(batch)], client_timeout=20)
            return grpc.StatusCode.OK
        except triton.InferenceServerException as exc:
            return code_named(exc.status()), exc.message()

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(infer, range(8)))
    codes = [a[0] if isinstance(a, tuple) else a for a in answers]
    assert set(codes) == {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.OK}
    assert all("too many requests waiting" in a[1] for a in answers if isinstance(a, tuple))
    time.sleep(1.5)  # the queue empties
    # tritonclient's `timeout` is the request's v2 timeout parameter, in microseconds (as Triton's).
    code, message = status_of(lambda: client.infer("alexnet_acmix", [tensor_input(batch)], timeout=100_000))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_unavailable_while_draining(grpc_client):
    client_http, client, _ = grpc_client()
    client_http.app.state.service.draining = True
    code, message = status_of(lambda: client.infer("alexnet_acmix", [tensor_input(np.zeros((1, 3, 128, 128),
                                                                                               np.float32))]))
    assert code == grpc.StatusCode.UNAVAILABLE and "draining" in message
    assert not client.is_server_ready()


def test_grpc_requests_count_in_the_metrics_by_method_and_code(grpc_client):
    client_http, client, _ = grpc_client()
    client.is_server_live()
    status_of(lambda: client.get_model_metadata("resnet"))
    text = client_http.get("/metrics").text
    assert 'grpc_requests_total{code="OK",method="ServerLive"} 1.0' in text
    assert 'grpc_requests_total{code="NOT_FOUND",method="ModelMetadata"} 1.0' in text


def test_a_call_the_client_gives_up_on_is_counted_cancelled_not_ok(grpc_client):
    # A fake backend (not the model), slower than the client's own deadline.
    client_http, client, _ = grpc_client(backend=SlowBackend(delay=1.0))
    code, _ = status_of(lambda: client.infer("alexnet_acmix", [tensor_input(np.zeros((1, 3, 128, 128), np.float32))],
                                             client_timeout=0.3))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED  # as the client sees it
    time.sleep(0.3)
    text = client_http.get("/metrics").text
    assert 'grpc_requests_total{code="CANCELLED",method="ModelInfer"} 1.0' in text
    assert 'code="OK",method="ModelInfer"' not in text


def test_model_ready_of_an_unknown_model_is_false_not_an_error_and_the_repository_index_lists_both(grpc_client):
    """As Triton: `if not client.is_model_ready(m)` must not raise over gRPC only."""
    _, client, _ = grpc_client()
    assert client.is_model_ready("alexnet_acmix") and client.is_model_ready("alexnet_acmix", "1")
    assert not client.is_model_ready("resnet") and not client.is_model_ready("alexnet_acmix", "2")
    index = client.get_model_repository_index(as_json=True)["models"]
    assert [(m["name"], m["version"], m["state"]) for m in index] == [
        ("alexnet_acmix", "1", "READY"), ("alexnet_acmix_image", "1", "READY")]


@pytest.mark.parametrize("call, extension", [
    (lambda c: c.load_model("alexnet_acmix"), "loading and unloading models is not supported"),
    (lambda c: c.get_log_settings(), "logging extension is not supported"),
    (lambda c: c.get_system_shared_memory_status(), "shared-memory extensions are not supported"),
])
def test_an_extension_this_server_lacks_is_unimplemented_by_name_and_counted(grpc_client, call, extension):
    client_http, client, _ = grpc_client()
    code, message = status_of(lambda: call(client))
    assert code == grpc.StatusCode.UNIMPLEMENTED and extension in message
    assert 'code="UNIMPLEMENTED"' in client_http.get("/metrics").text


def test_stream_infer_answers_each_request_once_with_its_result_or_its_error(grpc_client, onnx_model, cifar_like_jpegs):
    import queue

    _, client, _ = grpc_client()
    batch = np.stack([preprocess(decode_image(data)) for data in cifar_like_jpegs[:3]])
    expected = run_onnx(onnx_model, batch)
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    for i in range(3):
        client.async_stream_infer("alexnet_acmix", [tensor_input(batch[i : i + 1])], request_id=f"r{i}")
    client.async_stream_infer("alexnet_acmix", [tensor_input(batch[:1] * 0 + 200)], request_id="raw-pixels")
    client.async_stream_infer("resnet", [tensor_input(batch[:1])], request_id="unknown-model")
    got = [answers.get(timeout=30) for _ in range(5)]
    client.stop_stream()
    results = {r.get_response().id: r.as_numpy("logits") for r, e in got if e is None}
    errors = [e.message() for r, e in got if e is not None]
    assert sorted(results) == ["r0", "r1", "r2"] and answers.empty()
    for i in range(3):
        np.testing.assert_allclose(results[f"r{i}"][0], expected[i], rtol=1e-4, atol=1e-4)
    assert len(errors) == 2
    assert any("not a preprocessed image" in e for e in errors) and any("unknown model 'resnet'" in e for e in errors)


def test_stream_responses_carry_tritons_final_flag_when_the_request_asks_for_it(grpc_client):
    """A client that sets enable_empty_final_response reads responses until one is flagged final:
    without the flag it waited for ever."""
    import queue

    _, client, _ = grpc_client()
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    batch = np.zeros((1, 3, 128, 128), np.float32)
    client.async_stream_infer("alexnet_acmix", [tensor_input(batch)], request_id="asks",
                              enable_empty_final_response=True)
    client.async_stream_infer("alexnet_acmix", [tensor_input(batch)], request_id="does-not")
    got = [answers.get(timeout=30) for _ in range(2)]
    client.stop_stream()
    flags = {}
    for result, error in got:
        assert error is None
        response = result.get_response()
        final = response.parameters.get("triton_final_response")
        flags[response.id] = final.bool_param if final is not None else None
        assert result.as_numpy("logits").shape == (1, 10)
    assert flags == {"asks": True, "does-not": None}


def test_shared_memory_in_an_infer_request_is_refused_by_name_and_the_image_config_says_n_1(grpc_client,
                                                                                           cifar_like_jpegs):
    _, client, _ = grpc_client()
    batch = np.zeros((1, 3, 128, 128), np.float32)
    output = triton.InferRequestedOutput("logits")
    output.set_shared_memory("out", 40)  # ignored, the logits came back in the response
    code, message = status_of(lambda: client.infer("alexnet_acmix", [tensor_input(batch)], outputs=[output]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "output 'logits' names shared memory region 'out': the shared-memory extensions are not supported" in message
    given = triton.InferInput("image", [1, 3, 128, 128], "FP32")
    given.set_shared_memory("in", batch.nbytes)
    code, message = status_of(lambda: client.infer("alexnet_acmix", [given]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "input 'image' names shared memory region 'in'" in message
    config = client.get_model_config("alexnet_acmix_image").config
    assert list(config.input[0].dims) == [1] and list(config.input[0].reshape.shape) == []
    assert config.input[0].HasField("reshape")
    files = cifar_like_jpegs[:2]
    tensor = triton.InferInput("image", [2, 1], "BYTES")
    tensor.set_data_from_numpy(np.array(files, dtype=object).reshape(2, 1))
    assert client.infer("alexnet_acmix_image", [tensor]).as_numpy("logits").shape == (2, 10)


def test_stream_infer_needs_the_api_key(grpc_client):
    import queue

    _, client, _ = grpc_client(api_key="secret")
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    client.async_stream_infer("alexnet_acmix", [tensor_input(np.zeros((1, 3, 128, 128), np.float32))])
    result, error = answers.get(timeout=30)
    client.stop_stream()
    assert result is None and "API key" in error.message()


def test_statistics_count_each_models_requests_their_images_and_batches(grpc_client, cifar_like_jpegs):
    """Triton's statistics extension, as perf_analyzer reads it: successes and failures per model."""
    _, client, _ = grpc_client(max_queue_delay_ms=0)
    batch = np.stack([preprocess(decode_image(data)) for data in cifar_like_jpegs[:3]])
    client.infer("alexnet_acmix", [tensor_input(batch)])
    client.infer("alexnet_acmix_image", [bytes_input(cifar_like_jpegs[:2])])
    status_of(lambda: client.infer("alexnet_acmix", [tensor_input(batch * 0 + 200)]))  # refused: a failure
    both = client.get_inference_statistics(as_json=True)["model_stats"]
    assert [m["name"] for m in both] == ["alexnet_acmix", "alexnet_acmix_image"]
    tensor = client.get_inference_statistics("alexnet_acmix", "1", as_json=True)["model_stats"]
    assert len(tensor) == 1
    tensor, image = tensor[0], both[1]
    assert (tensor["inference_count"], image["inference_count"]) == ("3", "2")  # uint64: JSON strings
    stats = tensor["inference_stats"]
    assert stats["success"]["count"] == "1" and stats["fail"]["count"] == "1" and int(stats["success"]["ns"]) > 0
    assert int(stats["compute_infer"]["ns"]) > 0 and 1 <= int(tensor["execution_count"]) <= 3
    assert int(image["inference_stats"]["compute_input"]["ns"]) > 0  # the image model decodes its files
    code, _ = status_of(lambda: client.get_inference_statistics("resnet"))
    assert code == grpc.StatusCode.NOT_FOUND


def triton_samples(metrics_text: str) -> dict[str, float]:
    """The nv_* samples of a /metrics text, by name and labels as written."""
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in metrics_text.splitlines()
            if line.startswith("nv_")}


def test_metrics_have_tritons_per_model_figures_under_its_names(grpc_client, cifar_like_jpegs):
    """/metrics carries Triton's nv_inference_* metrics, as its own /metrics writes them (counters
    without _total, µs, labels model and version, failures by reason), equal to the statistics."""
    http, client, _ = grpc_client(max_queue_delay_ms=0)
    batch = np.stack([preprocess(decode_image(data)) for data in cifar_like_jpegs[:3]])
    client.infer("alexnet_acmix", [tensor_input(batch)])
    client.infer("alexnet_acmix_image", [bytes_input(cifar_like_jpegs[:2])])
    status_of(lambda: client.infer("alexnet_acmix", [tensor_input(batch * 0 + 200)]))  # refused: OTHER
    text = http.get("/metrics").text
    assert "# TYPE nv_inference_request_success counter" in text
    assert "# TYPE nv_inference_pending_request_count gauge" in text
    nv = triton_samples(text)
    stats = {m["name"]: m for m in client.get_inference_statistics(as_json=True)["model_stats"]}
    for model in ("alexnet_acmix", "alexnet_acmix_image"):
        labels = f'model="{model}",version="1"'
        inference = stats[model]["inference_stats"]
        assert nv[f"nv_inference_request_success{{{labels}}}"] == int(inference["success"]["count"])
        assert nv[f"nv_inference_count{{{labels}}}"] == int(stats[model]["inference_count"])
        assert nv[f"nv_inference_exec_count{{{labels}}}"] == int(stats[model]["execution_count"])
        for name, key in (("request", "success"), ("queue", "queue"), ("compute_infer", "compute_infer")):
            assert nv[f"nv_inference_{name}_duration_us{{{labels}}}"] == round(int(inference[key]["ns"]) / 1000)
        assert nv[f"nv_inference_pending_request_count{{{labels}}}"] == 0
    failures = {reason: nv[f'nv_inference_request_failure{{model="alexnet_acmix",reason="{reason}",version="1"}}']
                for reason in ("REJECTED", "CANCELED", "BACKEND", "OTHER")}
    assert failures == {"REJECTED": 0, "CANCELED": 0, "BACKEND": 0, "OTHER": 1}
    assert nv['nv_inference_request_success{model="alexnet_acmix",version="1"}'] == 1


def test_a_failed_requests_reason_is_tritons():
    import asyncio

    from service.errors import BadRequest, DeadlineExceeded, InferenceFailed, Overloaded, Unavailable
    from service.inference import failure_reason

    assert [failure_reason(exc) for exc in (Overloaded("full"), Unavailable("draining"), DeadlineExceeded("late"),
                                            asyncio.CancelledError(), InferenceFailed("boom"), BadRequest("bad"))] == [
        "REJECTED", "REJECTED", "REJECTED", "CANCELED", "BACKEND", "OTHER"]



def test_statistics_have_triton_batch_and_cache_figures_on_both_protocols(grpc_client, cifar_like_jpegs):
    """batch_stats: per model, one entry per batch size executed (the model's images in the batch),
    their counts adding up to execution_count; cache_hit and cache_miss zero (no cache), as Triton
    always sends them (perf_analyzer's HTTP reader reads inference_stats.cache_hit.count). Both used
    to be missing or empty."""
    from google.protobuf import json_format
    from tritonclient.grpc import service_pb2

    # A full batch (5) is cut at once; less waits the 5 s delay: the first two requests, sent
    # together, make one batch of 2 + 3 images, the third a batch of its own.
    http, client, _ = grpc_client(max_batch_size=5, max_queue_delay_ms=5000)
    with ThreadPoolExecutor(2) as pool:
        tensor = pool.submit(client.infer, "alexnet_acmix", [tensor_input(np.zeros((2, 3, 128, 128), np.float32))])
        image = pool.submit(client.infer, "alexnet_acmix_image", [bytes_input(cifar_like_jpegs[:3])])
        tensor.result(), image.result()
    client.infer("alexnet_acmix", [tensor_input(np.zeros((5, 3, 128, 128), np.float32))])
    answer = http.get("/v2/models/stats").json()
    assert json_format.ParseDict(answer, service_pb2.ModelStatisticsResponse()) == client.get_inference_statistics()
    tensor, image = answer["model_stats"]
    for model, sizes in ((tensor, [2, 5]), (image, [3])):
        stats = model["inference_stats"]
        assert list(stats) == ["success", "fail", "queue", "compute_input", "compute_infer", "compute_output",
                               "cache_hit", "cache_miss"]
        assert stats["cache_hit"] == stats["cache_miss"] == {"count": 0, "ns": 0}
        assert [entry["batch_size"] for entry in model["batch_stats"]] == sizes
        for entry in model["batch_stats"]:
            assert list(entry) == ["batch_size", "compute_input", "compute_infer", "compute_output"]
            assert entry["compute_input"] == entry["compute_output"] == {"count": 1, "ns": 0}  # not measured
            assert entry["compute_infer"]["count"] == 1 and entry["compute_infer"]["ns"] > 0
        assert model["execution_count"] == len(sizes) == sum(e["compute_infer"]["count"] for e in model["batch_stats"])
        assert model["inference_count"] == sum(sizes)
    # The batch of 2 + 3 images: one backend call, the same time in both models' entries.
    assert tensor["batch_stats"][0]["compute_infer"]["ns"] == image["batch_stats"][0]["compute_infer"]["ns"]


def raw_request(batch: np.ndarray, id: str = "") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="alexnet_acmix", id=id)
    request.inputs.add(name="image", datatype="FP32", shape=list(batch.shape))
    request.raw_input_contents.append(batch.astype("<f4").tobytes())
    return request


MALFORMED = b"\xff\xff\xff\xff\x0f"  # a field of wire type 7, which protobuf does not have


def test_stream_infer_answers_in_the_order_the_requests_came_and_computes_them_concurrently(grpc_client):
    """As Triton: tritonclient's callback gets an error without the request's id, so the position is the id."""
    import queue

    # A fake backend (not the model): slow, so that the first request still computes when the bad one fails.
    backend = SlowBackend(delay=0.5)
    _, client, _ = grpc_client(backend=backend)
    started = len(backend.calls)  # the warm-up's
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    client.async_stream_infer("alexnet_acmix", [tensor_input(np.zeros((1, 3, 128, 128), np.float32))],
                              request_id="first")
    bad = triton.InferInput("image", [1, 3, 128, 127], "FP32")
    bad._raw_content = b""
    client.async_stream_infer("alexnet_acmix", [bad], request_id="bad")
    for name in ("third", "fourth"):
        client.async_stream_infer("alexnet_acmix", [tensor_input(np.zeros((1, 3, 128, 128), np.float32))],
                                  request_id=name)
    got = [answers.get(timeout=30) for _ in range(4)]
    client.stop_stream()
    assert [r.get_response().id if e is None else "error" for r, e in got] == ["first", "error", "third", "fourth"]
    assert "[N, 3, 128, 128]" in got[1][1].message()
    assert len(backend.calls[started:]) < 3  # batched together, not computed one after another


def test_a_malformed_message_is_invalid_argument_counted_and_logged_without_a_traceback(grpc_client, caplog):
    caplog.set_level(logging.INFO, logger="service.requests")
    client_http, _, address = grpc_client()
    with grpc.insecure_channel(address) as channel:
        for method in ("ModelInfer", "ModelMetadata"):
            call = channel.unary_unary(f"/inference.GRPCInferenceService/{method}")  # bytes as they are
            with pytest.raises(grpc.RpcError) as caught:
                call(MALFORMED, timeout=30)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
            assert caught.value.details().startswith("malformed request message"), method
            assert f"{method}Request" in caught.value.details()
    text = client_http.get("/metrics").text
    assert 'grpc_requests_total{code="INVALID_ARGUMENT",method="ModelInfer"} 1.0' in text
    assert 'grpc_requests_total{code="INVALID_ARGUMENT",method="ModelMetadata"} 1.0' in text
    assert any("route=grpc ModelInfer status=INVALID_ARGUMENT" in r.getMessage() for r in caplog.records)
    assert not [r for r in caplog.records if r.exc_info or r.levelname == "ERROR"]


def test_a_malformed_message_in_a_stream_is_answered_in_its_place_and_the_stream_goes_on(grpc_client, caplog):
    """Chosen over ending the stream: gRPC frames each message, so the ones after it are whole."""
    client_http, _, address = grpc_client()
    batch = np.zeros((8, 3, 128, 128), np.float32)
    messages = [raw_request(batch, "a").SerializeToString(), MALFORMED, raw_request(batch[:1], "c").SerializeToString()]
    with grpc.insecure_channel(address) as channel:
        stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer",
                                       response_deserializer=pb.ModelStreamInferResponse.FromString)
        call = stream(iter(messages), timeout=30)
        responses = list(call)
        assert call.code() == grpc.StatusCode.OK
    assert [(r.infer_response.id, r.error_message[:25]) for r in responses] == [
        ("a", ""), ("", "malformed request message"), ("c", "")]
    assert 'grpc_requests_total{code="INVALID_ARGUMENT",method="ModelStreamInfer"} 1.0' in client_http.get("/metrics").text
    assert not [r for r in caplog.records if r.exc_info or r.levelname == "ERROR"]


@pytest.mark.parametrize("model, datatype, shape, field, values", [
    ("alexnet_acmix_image", "BYTES", [1], "bytes_contents", [b"an image"]),
    ("alexnet_acmix", "FP32", [1, 3, 128, 128], "fp32_contents", [0.0] * (3 * 128 * 128)),
])
def test_raw_and_typed_contents_together_are_invalid_argument(grpc_client, cifar_like_jpegs, model, datatype,
                                                                shape, field, values):
    _, _, address = grpc_client()
    request = pb.ModelInferRequest(model_name=model)
    getattr(request.inputs.add(name="image", datatype=datatype, shape=shape).contents, field).extend(values)
    raw = np.zeros(shape, np.float32).tobytes() if datatype == "FP32" else \
        len(cifar_like_jpegs[0]).to_bytes(4, "little") + cifar_like_jpegs[0]
    request.raw_input_contents.append(raw)
    with pytest.raises(grpc.RpcError) as caught:
        raw_call(address, request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == (f"contents field must not be specified when using raw_input_contents for "
                                      f"'image' for model {model!r}")


def test_a_response_larger_than_its_request_arrives(grpc_client):
    """Classification strings make the response several times the request: the upload limit is not the
    response's."""
    _, client, _ = grpc_client(max_upload_bytes=20_000)
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="GIF")
    files = [buffer.getvalue()] * 512
    result = client.infer("alexnet_acmix_image", [bytes_input(files)],
                          outputs=[triton.InferRequestedOutput("logits", class_count=10)], client_timeout=60)
    assert result.as_numpy("logits").shape == (512, 10)
    assert result.get_response().ByteSize() > 20_000 + (1 << 16)  # over what the send limit was


@pytest.mark.parametrize("field, value, named", [
    ("string_param", "3", "string_param '3'"), ("double_param", 3.0, "double_param 3.0"),
    ("bool_param", True, "bool_param True"),
])
def test_a_classification_parameter_not_an_integer_is_named_in_the_error(grpc_client, field, value, named):
    _, _, address = grpc_client()
    request = raw_request(np.zeros((1, 3, 128, 128), np.float32))
    setattr(request.outputs.add(name="logits").parameters["classification"], field, value)
    with pytest.raises(grpc.RpcError) as caught:
        raw_call(address, request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "classification must be an integer" in caught.value.details() and named in caught.value.details()


def test_the_api_key_is_taken_in_the_forms_http_takes(grpc_client):
    client_http, client, _ = grpc_client(api_key="secret")
    forms = [{"x-api-key": "secret"}, {"authorization": "Bearer secret"}, {"authorization": "bearer secret"},
             {"authorization": "BEARER  secret "}, {"authorization": "secret"}, {"authorization": "Basic secret"},
             {"authorization": "Bearer wrong"}, {"x-api-key": "wrong"}]

    def grpc_takes(headers):
        try:
            client.get_model_repository_index(headers=headers)
            return True
        except triton.InferenceServerException as exc:
            assert code_named(exc.status()) == grpc.StatusCode.UNAUTHENTICATED
            return False

    over_grpc = [grpc_takes(headers) for headers in forms]
    over_http = [client_http.post("/v2/repository/index", headers=headers, json={}).status_code == 200
                 for headers in forms]
    assert over_grpc == over_http == [True, True, True, True, False, False, False, False]


@pytest.mark.parametrize("field, values", [
    ("int_contents", [0] * (3 * 128 * 128)), ("fp64_contents", [0.0] * (3 * 128 * 128)), ("bytes_contents", [b"x"]),
])
def test_fp32_values_in_another_typed_field_get_an_error_naming_both_fields(grpc_client, field, values):
    _, _, address = grpc_client()
    request = pb.ModelInferRequest(model_name="alexnet_acmix")
    getattr(request.inputs.add(name="image", datatype="FP32", shape=[1, 3, 128, 128]).contents, field).extend(values)
    with pytest.raises(grpc.RpcError) as caught:
        raw_call(address, request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == ("input 'image' is FP32, which takes contents.fp32_contents (or "
                                      f"raw_input_contents), not contents.{field}")


def test_a_grpc_port_taken_after_the_check_is_one_logged_line_and_the_backend_is_released(onnx_model, caplog):
    """`python -m service` checks its ports before it starts (service/workers.py, port_problem); one
    taken in between fails the start here, named, with the service closed (grpcio 1.85 raises where
    earlier versions returned 0, which this once missed: a traceback)."""
    import socket

    from fastapi.testclient import TestClient

    from service.main import create_app
    from tests.service.conftest import service_settings

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        app = create_app(service_settings(onnx_model, grpc_port=port))
        with caplog.at_level(logging.ERROR), pytest.raises(OSError, match=f"cannot listen for gRPC on 127.0.0.1:{port} "
                                                           r"\(another program holds the port"):
            TestClient(app).__enter__()
    state = app.state.service
    assert state.startup_error.startswith(f"cannot listen for gRPC on 127.0.0.1:{port}")
    assert not state.ready and state.backend.loaded is False
    assert [r.getMessage() for r in caplog.records if r.name == "service"][-1] == state.startup_error


def test_grpcs_standard_health_service_answers_the_services_readiness(grpc_client):
    """What Kubernetes' gRPC probes and grpc_health_probe call (grpc.health.v1.Health): SERVING while
    /readyz is 200, NOT_SERVING while it is not (here: batches failing in a row), for the server and
    each model; Watch streams the change."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    test_client, _, address = grpc_client()
    state = test_client.app.state.service
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "alexnet_acmix", "alexnet_acmix_image"):
            assert health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status == serving
        with pytest.raises(grpc.RpcError) as caught:
            health.Check(health_pb2.HealthCheckRequest(service="resnet"), timeout=5)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND and "unknown service 'resnet'" in caught.value.details()
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert next(watch).status == serving
        state.consecutive_failures = state.settings.max_consecutive_failures  # as if batches failed in a row
        assert test_client.get("/readyz").status_code == 503
        assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == not_serving
        assert next(watch).status == not_serving
        state.consecutive_failures = 0
        assert next(watch).status == serving
        unknown = health.Watch(health_pb2.HealthCheckRequest(service="resnet"), timeout=10)
        assert next(unknown).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        state.draining = True  # SIGTERM: the watches end, so that they never hold the gRPC drain
        assert next(watch).status == not_serving
        assert list(watch) == [] and list(unknown) == []


def test_a_malformed_health_request_is_invalid_argument_without_a_traceback(grpc_client, caplog):
    """grpc's own deserializer answered UNKNOWN ("Unexpected DecodeError") and logged a traceback."""
    _, _, address = grpc_client()
    with grpc.insecure_channel(address) as channel:
        for method in ("Check", "Watch"):
            call = getattr(channel, "unary_unary" if method == "Check" else "unary_stream")(f"/grpc.health.v1.Health/{method}")
            with pytest.raises(grpc.RpcError) as caught:
                result = call(MALFORMED, timeout=10)
                next(iter(result)) if method == "Watch" else None
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, caught.value.details())
            assert caught.value.details().startswith("malformed request message") and "HealthCheckRequest" in caught.value.details()
    assert not [r for r in caplog.records if r.exc_info or r.levelname == "ERROR"]


def test_an_idle_stream_ends_when_the_drain_begins(grpc_client):
    """An open ModelStreamInfer stream (a client between requests) held the gRPC drain for its whole
    grace (ACMIX_REQUEST_TIMEOUT_S + 1 s): the requests it had sent are answered, then it ends."""
    import queue

    test_client, _, address = grpc_client()
    more: queue.Queue = queue.Queue()

    def requests():
        yield raw_request(np.zeros((1, 3, 128, 128), np.float32), id="sent").SerializeToString()
        while (item := more.get()) is not None:  # idle: the client sends nothing more
            yield item

    with grpc.insecure_channel(address) as channel:
        stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")(requests(), timeout=20)
        first = pb.ModelStreamInferResponse.FromString(next(stream))
        assert first.infer_response.id == "sent" and not first.error_message
        started = time.monotonic()
        test_client.app.state.service.draining = True  # SIGTERM: the drain begins
        assert list(stream) == []  # the stream ends, without an error
        assert time.monotonic() - started < 5
        more.put(None)


def test_grpc_listens_on_an_ipv6_host(make_client):
    """ACMIX_HOST=:: or ::1 with gRPC on could not start: the address was written without brackets."""
    import socket

    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    port = free_port()
    make_client(grpc_port=port, host="::1")
    client = triton.InferenceServerClient(f"[::1]:{port}")
    try:
        assert client.is_server_live() and client.is_model_ready("alexnet_acmix")
    finally:
        client.close()


def test_the_grpc_servers_own_lines_are_the_services_not_the_request_logs(grpc_client, caplog):
    caplog.set_level(logging.INFO)
    _, _, address = grpc_client()
    started = [r for r in caplog.records if r.getMessage() == f"gRPC (KServe v2) on {address}"]
    assert [r.name for r in started] == ["service"]
