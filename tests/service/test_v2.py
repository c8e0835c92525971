"""The v2 request parsing as pure functions (no server): every malformed header, tensor and parameter."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from service import inference
from service.api.v2 import decoded_body, read_image_input, read_tensor_input, request_timeout, split_body
from service.errors import BadRequest, TooLarge


def header(**tensor) -> dict:
    return {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 3, 128, 128], **tensor}]}


NESTED_WITH_TRUE = np.full((1, 3, 128, 128), 0.5).tolist()
NESTED_WITH_TRUE[0][2][127][127] = True


@pytest.mark.parametrize("body, binary, message", [
    ({"inputs": [{"name": "image", "shape": [1, 3, 64, 64], "datatype": "FP32", "data": [0.0] * 12288}]}, b"",
     "must have shape [N, 3, 128, 128]"),
    ({"inputs": [{"name": "image", "shape": [1, 3, 128, 128], "datatype": "INT8", "data": [0] * 49152}]}, b"",
     "must be FP32"),
    ({"inputs": [{"name": "pixels", "shape": [1, 3, 128, 128], "datatype": "FP32", "data": [0.0]}]}, b"",
     "unexpected input 'pixels'"),
    (header(data=[0.0] * 10), b"", "needs 49152 values, got 10"),
    (header(parameters={"binary_data_size": 100}), b"\0" * 100, "needs 196608 bytes of FP32"),
    (header(parameters={"binary_data_size": -1}), b"", "binary_data_size must be a non-negative integer"),
    (header(shape=[1, 3, "128", 128], data=[]), b"", "has no valid shape"),
    (header(shape=[0, 3, 128, 128], data=[]), b"", "with N >= 1"),
    (header(), b"", "neither data nor binary_data_size"),
    # a shape whose product wraps around in int64 (np.prod gave 0): refused, never a 500
    (header(shape=[2**50, 3, 128, 128], data=[]), b"", f"needs {2**50 * 49152} values, got 0"),
    (header(shape=[2**50, 3, 128, 128], parameters={"binary_data_size": 0}), b"", f"needs {2**50 * 49152 * 4} bytes"),
    (header(data=[10**400] + [0] * 49151), b"", "data must be JSON numbers; it holds nulls, objects or integers"),
    # numpy would read these as numbers ("0.5" -> 0.5, true -> 1.0); Triton refuses them
    (header(data=["0.5"] * 49152), b"", "data must be JSON numbers; it holds strings"),
    (header(data=[True] * 49152), b"", "data must be JSON numbers; it holds booleans"),
    (header(data=[1.5, False] + [0.25] * 49150), b"", "data must be JSON numbers; it holds booleans"),  # read as 0.0
    (header(data=NESTED_WITH_TRUE), b"", "data must be JSON numbers; it holds booleans"),  # read as 1, deep inside
    (header(data=[None] + [0.0] * 49151), b"", "data must be JSON numbers; it holds nulls"),
    (header(data=[[0.0], 1.0]), b"", "data is not a \\(nested\\) list of numbers"),
    ({"inputs": []}, b"", "exactly one input"),
    ({"inputs": {"image": 1}}, b"", "exactly one input"),
])
def test_bad_tensor_inputs_name_the_cause(body, binary, message):
    with pytest.raises(BadRequest, match=message.replace("[", r"\[").replace("]", r"\]")):
        read_tensor_input(body, binary)


def test_a_good_tensor_input_in_either_form():
    batch = np.random.default_rng(0).standard_normal((2, 3, 128, 128)).astype(np.float32)
    batch[0, 0, 0, :3] = [0.0, 1.0, 1]  # numbers that booleans would be read as stay numbers
    np.testing.assert_array_equal(read_tensor_input(header(shape=[2, 3, 128, 128], data=batch.tolist()), b""), batch)
    binary = header(shape=[2, 3, 128, 128], parameters={"binary_data_size": batch.nbytes})
    np.testing.assert_array_equal(read_tensor_input(binary, batch.tobytes()), batch)


@pytest.mark.parametrize("body, length, message", [
    (b'{"inputs": []}', "abc", "is not an integer"),
    (b'{"inputs": []}', "999", "does not fit a body"),
    (b"[1, 2]", None, "must be a JSON object"),
    (b'{"a": NaN}', None, "NaN: JSON numbers must be finite"),
    (b'{"a": -Infinity}', None, "-Infinity"),
    (b"\xff\xfe", None, "is not valid JSON"),
    (b"[" * 50_000 + b"]" * 50_000, None, "too deeply"),
    (b'{"id": ' + b"1" * 5000 + b"}", None, "an integer of more than 4,300 digits"),  # Python's limit
    (b"", None, "the request body is empty"),
    (b'{"inputs": []}\0\0\0\0', None, "needs the Inference-Header-Content-Length header"),
    (b'{"id": 7, "inputs": []}', None, "the request id must be a string, got int"),
    (b'{"id": {"a": 1}, "inputs": []}', None, "the request id must be a string, got dict"),
])
def test_bad_bodies(body, length, message):
    with pytest.raises(BadRequest, match=message):
        split_body(body, length)


def test_the_binary_tail_is_split_at_the_header_length():
    text = json.dumps(header()).encode()
    parsed, tail = split_body(text + b"tail", str(len(text)))
    assert parsed == header() and tail == b"tail"


def test_images_in_binary_and_in_base64_json():
    files = [b"first image", b"second"]
    packed = inference.pack_bytes(files)
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": len(packed)}}]}
    assert read_image_input(body, packed) == files
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2],
                        "data": [base64.b64encode(f).decode() for f in files]}]}
    assert read_image_input(body, b"") == files
    with pytest.raises(BadRequest, match="shape \\[3\\] but the BYTES data holds 2 elements"):
        inference.unpack_bytes(packed, 3)
    with pytest.raises(BadRequest, match="element 1: its length 6 runs past the data"):
        inference.unpack_bytes(packed[:-1], 2)
    with pytest.raises(BadRequest, match="must be BYTES"):
        read_image_input(header(), b"")


@pytest.mark.parametrize("parameters, expected", [
    ({}, None), ({"timeout": 250_000}, 0.25),
    ({"timeout": 10**400}, (2**63 - 1) / 1e6),  # past float: capped (the server's own limit applies)
])
def test_the_timeout_parameter_is_microseconds(parameters, expected):
    assert request_timeout({"parameters": parameters}) == expected


@pytest.mark.parametrize("timeout", [0, -5, 1.5, "100", True])
def test_a_bad_timeout_parameter_is_refused(timeout):
    with pytest.raises(BadRequest, match="positive integer of microseconds"):
        request_timeout({"parameters": {"timeout": timeout}})


@pytest.mark.parametrize("k", [-1, 11, "3", 2.5, True])
def test_a_bad_classification_count_is_refused(k):
    with pytest.raises(BadRequest, match="classification must be an integer in 0..10"):
        inference.classification_count(k)


def test_a_compressed_body_is_decompressed_within_the_upload_limit():
    import gzip
    import zlib

    body = b'{"inputs": []}'
    assert decoded_body(gzip.compress(body), "gzip", 100) == body
    assert decoded_body(zlib.compress(body), "Deflate", 100) == body
    assert decoded_body(body, None, 100) == body
    with pytest.raises(TooLarge, match="decompresses to more than the upload limit of 1000 bytes"):
        decoded_body(gzip.compress(b"0" * 10_000_000), "gzip", 1000)  # 10 MB from ~10 kB: a bomb
    with pytest.raises(BadRequest, match="not valid gzip data"):
        decoded_body(b"plain", "gzip", 100)
    with pytest.raises(BadRequest, match="cut short"):
        decoded_body(gzip.compress(body)[:-12], "gzip", 100)
    with pytest.raises(BadRequest, match="Content-Encoding 'br' is not supported"):
        decoded_body(body, "br", 100)
    # gzip members one after another are one body (RFC 1952; `cat a.gz b.gz`), within the limit too
    assert decoded_body(gzip.compress(body[:5]) + gzip.compress(body[5:]), "gzip", 100) == body
    with pytest.raises(TooLarge, match="upload limit of 20 bytes"):
        decoded_body(gzip.compress(body) + gzip.compress(body), "gzip", 20)
    with pytest.raises(BadRequest, match="not valid gzip data"):
        decoded_body(gzip.compress(body) + b"garbage!", "gzip", 100)
    with pytest.raises(BadRequest, match="8 bytes after the end of its deflate data"):
        decoded_body(zlib.compress(body) + b"garbage!", "deflate", 100)
