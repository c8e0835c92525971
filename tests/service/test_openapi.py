"""The API docs (/openapi.json) describe what the service answers: every status a bad request gets is
documented for its route, with a schema its body matches (what schemathesis checks)."""

from __future__ import annotations

import json

import numpy as np
import pytest

jsonschema = pytest.importorskip("jsonschema")

TENSOR = "/v2/models/alexnet_acmix/infer"
IMAGE = "/v2/models/alexnet_acmix_image/infer"
INFER = "/v2/models/{model}/infer"


def documented(spec: dict, method: str, template: str, status: int, media_type: str) -> dict:
    """The schema the docs give for this answer, with the components its $refs name."""
    responses = spec["paths"][template][method]["responses"]
    assert str(status) in responses, f"{method.upper()} {template}: {status} is not documented"
    content = responses[str(status)].get("content", {})
    assert media_type in content, f"{method.upper()} {template} {status}: {media_type} is not documented"
    return {**content[media_type]["schema"], "components": spec["components"]}


def tensor_request(**extra) -> dict:
    data = np.zeros((1, 3, 128, 128), np.float32).reshape(-1).tolist()
    return {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 3, 128, 128], "data": data}], **extra}


CASES = [
    # (method, path, documented path, request arguments)
    ("post", "/predict", "/predict", {"files": {"file": ("a.png", b"")}}),
    ("post", "/predict", "/predict", {"files": {"file": ("a.png", b"not an image")}}),
    ("post", "/predict", "/predict", {"files": [("file", ("a.png", b"x")), ("file", ("b.png", b"x"))]}),
    ("post", "/predict", "/predict", {"content": b"--x\r\n", "headers": {"content-type": "multipart/form-data"}}),
    ("post", "/predict", "/predict", {"files": {"image": ("a.png", b"x")}}),
    ("post", "/predict", "/predict", {"files": {"file": ("a.png", b"x" * 2048)}, "headers": {"content-length": "9" * 12}}),
    ("post", "/predict/batch", "/predict/batch", {"data": {"top_k": "3"}}),
    ("post", "/predict/batch", "/predict/batch", {"files": [("file", ("a.png", b"x"))] * 200}),
    ("post", TENSOR, INFER, {"content": b""}),
    ("post", TENSOR, INFER, {"content": b"{"}),
    ("post", TENSOR, INFER, {"content": json.dumps(tensor_request(outputs=[{"name": "probabilities"}]))}),
    ("post", TENSOR, INFER, {"content": b"{}", "headers": {"Inference-Header-Content-Length": "-1"}}),
    ("post", IMAGE, INFER, {"json": {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["!"]}]}}),
    ("post", "/v2/models/nope/infer", INFER, {"json": tensor_request()}),
    ("get", "/v2/models/nope", "/v2/models/{model}", {}),
    ("get", "/v2/models/nope/config", "/v2/models/{model}/config", {}),
    ("get", "/v2/models/nope/ready", "/v2/models/{model}/ready", {}),
    ("get", "/v2/models/nope/stats", "/v2/models/{model}/stats", {}),
    ("get", "/v2/models/stats?model=nope", "/v2/models/stats", {}),
    ("post", "/v2/repository/index", "/v2/repository/index", {"content": b"[]"}),
]


@pytest.mark.parametrize("method, path, template, kwargs", CASES, ids=[f"{m} {p} {i}" for i, (m, p, _, _) in
                                                                         enumerate(CASES)])
def test_every_error_is_documented_with_the_body_it_has(make_client, method, path, template, kwargs):
    client = make_client(max_queue_size=100)
    spec = client.get("/openapi.json").json()
    response = client.request(method.upper(), path, **kwargs)
    assert 400 <= response.status_code < 500, response.text
    schema = documented(spec, method, template, response.status_code, "application/json")
    jsonschema.validate(response.json(), schema)


def test_the_inference_request_and_both_forms_of_its_answer_are_documented(client):
    spec = client.get("/openapi.json").json()
    operation = spec["paths"][INFER]["post"]
    body = operation["requestBody"]["content"]
    jsonschema.validate(tensor_request(), {**body["application/json"]["schema"], "components": spec["components"]})
    assert "application/octet-stream" in body  # the binary tensor data extension
    assert "Inference-Header-Content-Length" in [p["name"] for p in operation["parameters"]]

    answer = client.post(TENSOR, json=tensor_request())
    assert answer.status_code == 200
    jsonschema.validate(answer.json(), documented(spec, "post", INFER, 200, "application/json"))
    binary = client.post(TENSOR, json=tensor_request(parameters={"binary_data_output": True}))
    assert binary.headers["content-type"] == "application/octet-stream"
    documented(spec, "post", INFER, 200, "application/octet-stream")


def test_liveness_and_metrics_are_documented_as_answered(client):
    spec = client.get("/openapi.json").json()
    jsonschema.validate(client.get("/healthz").json(), documented(spec, "get", "/healthz", 200, "application/json"))
    documented(spec, "get", "/healthz", 503, "application/json")
    assert client.get("/metrics").headers["content-type"].startswith("text/plain")
    documented(spec, "get", "/metrics", 200, "text/plain")


def test_a_batch_without_files_is_documented_as_invalid(client):
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    assert schemas["Body_predict_batch_predict_batch_post"]["properties"]["file"]["minItems"] == 1
    assert client.post("/predict/batch", data={"top_k": "3"}).status_code == 422


def test_what_the_docs_call_valid_is_what_the_service_takes(client):
    """Where schemathesis read a valid request in the docs that the service refuses: a header of
    "null", an empty binary body, an empty or non-positive shape."""
    spec = client.get("/openapi.json").json()
    for route in ("/predict", "/predict/batch"):
        [header] = spec["paths"][route]["post"]["parameters"]
        assert header["name"] == "X-Request-Timeout-Ms" and header["schema"]["type"] == "number"
        assert header["schema"]["minimum"] == 0.001 and "anyOf" not in header["schema"]
    body = spec["paths"][INFER]["post"]["requestBody"]["content"]
    assert body["application/octet-stream"]["schema"]["minLength"] == 1
    assert client.post(TENSOR, content=b"", headers={"content-type": "application/octet-stream"}).status_code == 400
    shape = body["application/json"]["schema"]["properties"]["inputs"]["items"]["properties"]["shape"]
    for bad in ([], [0, 3, 128, 128], [1, 3, 128, 128, 1]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, shape)
    assert client.post("/predict", files={"file": ("a.png", b"x")}, headers={"X-Request-Timeout-Ms": "null"}
                       ).status_code == 422
