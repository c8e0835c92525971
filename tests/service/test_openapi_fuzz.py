"""Property-based API test (schemathesis): for requests generated from /openapi.json, valid and
invalid ones, on every documented operation, the service never answers 5xx, and every answer's
status, Content-Type and body (and headers, where the docs give any) are ones the docs give for
that route. Deterministic (derandomized): the same requests on every run of the same code. One
operation: `pytest tests/service/test_openapi_fuzz.py -k "infer"`.

Only the checks that hold are run. The others were judged false positives in a full
`schemathesis --checks all` run: a valid request rejected (random bytes are not a decodable
image, a JSON tensor whose shape does not match its data), an invalid one accepted (multipart
parts carry no types, unknown headers are ignored, a body of only whitespace on
/v2/repository/index counts as empty), and auth ignored (it is only enforced with ACMIX_API_KEY
set). The hand-written cases beside this are in tests/service/test_openapi.py."""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, settings  # noqa: E402  (schemathesis brings hypothesis)
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core import NOT_SET  # noqa: E402

from service.main import create_app  # noqa: E402
from tests.service.conftest import service_settings  # noqa: E402

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]
MODELS = ("alexnet_acmix", "alexnet_acmix_image")

# The docs are read at collection, so that each operation is a test of its own (spread over `-n 2`),
# from an app that loads nothing (no lifespan; the docs do not depend on the model). Each test
# calls an app over the tiny model instead, whose docs are checked to be the same.
schema = schemathesis.openapi.from_asgi(
    "/openapi.json", create_app(service_settings(Path("docs-only.onnx")), manage_lifespan=False))


@schema.hook
def map_case(context, case):
    """Steers generated requests past the first check that would stop nearly all of them, so that
    what lies behind it is exercised too. Which way a case goes is a function of the request, so
    that it replays (and shrinks) the same.

    - {model} is any string in the docs: two cases in three name a served model instead, else
      nearly every request there stops at the 404;
    - the binary extension's Inference-Header-Content-Length is in most generated requests: three
      JSON bodies in four go without it, else nearly every one is cut to a few bytes, not JSON."""
    body = None if case.body is NOT_SET else case.body
    digest = zlib.crc32(repr((case.path_parameters, case.query, case.headers, body, case.media_type)).encode())
    model = (case.path_parameters or {}).get("model")
    if model is not None and digest % 3 < len(MODELS):
        case.path_parameters = {**case.path_parameters, "model": MODELS[digest % 3]}
    if case.media_type == "application/json" and case.headers and digest // 3 % 4:
        case.headers = {name: value for name, value in case.headers.items()
                        if name.lower() != "inference-header-content-length"}
    return case


# One backend (the GPU's is not here); a parameter also gives each operation's test its own id: with
# pytest 9.2, schemathesis 4.32.5's items otherwise all share the function's (and -k finds none).
@pytest.fixture(params=["onnxruntime"])
def app(request, onnx_model):
    """A fresh app per operation: schemathesis starts its lifespan (the backend loaded, the batcher
    running) on the first request and ends it after the test."""
    app = create_app(service_settings(onnx_model, backend=request.param, max_queue_size=100))
    assert app.openapi() == schema.raw_schema
    return app


@schema.parametrize()
@settings(max_examples=100, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
def test_no_server_error_and_every_answer_as_documented(app, case):
    case.call_and_validate(app=app, checks=CHECKS)
