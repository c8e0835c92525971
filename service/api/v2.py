"""KServe v2 / Open Inference Protocol over REST, with the binary tensor data and classification
extensions, as Triton serves them: standard clients (tritonclient.http) work unchanged.

The models, their metadata and the checks of their inputs are service/inference.py's (shared
with gRPC); this module only reads and writes the HTTP forms:

* JSON: `inputs[0].data` a (nested) list of numbers for FP32 (JSON numbers: strings, booleans
  and nulls are refused), a list of base64 strings (each one encoded image file) for BYTES; NaN
  and infinities are refused, as are bodies nested deeper than Python's parser goes. The request
  `id`, where given, is a string, echoed in the response.
* binary: `parameters.binary_data_size` on the input and the tensor after the JSON header
  (Inference-Header-Content-Length), FP32 little-endian, or BYTES as Triton packs them (each
  element a 4-byte little-endian length, then its bytes).
* request `parameters.timeout`: microseconds (as Triton), the request's deadline, never later
  than the server's own (ACMIX_REQUEST_TIMEOUT_S).
* a body with `Content-Encoding: gzip` (one or more members) or `deflate` is decompressed,
  within the upload limit.

Beside inference: Triton's repository index and statistics; its other extensions' routes answer
501 naming the extension.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import zlib

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from model.spec import INPUT_NAME, OUTPUT_NAME
from service import inference
from service.api.security import require_api_key
from service.errors import BadRequest, TooLarge, Unsupported, error_responses
from service.state import ServiceState, StateDep

router = APIRouter(prefix="/v2", tags=["kserve-v2"])
HEADER_LENGTH = "Inference-Header-Content-Length"
# What a datatype kind of numpy's reading of JSON data means, for FP32 data that is not numbers.
NON_NUMBERS = {"b": "booleans", "U": "strings", "O": "nulls, objects or integers beyond 64 bits"}
# A `timeout` parameter past this (microseconds, about 292,000 years) counts as this.
MAX_TIMEOUT_US = 2**63 - 1

# The documented forms of the bodies this module reads and writes by hand (the API docs, /openapi.json).
NOT_READY = {503: {"description": "Not ready", "content": {"application/json": {"schema": {
    "type": "object", "required": ["ready"], "properties": {"ready": {"const": False}}}}}}}
INFER_REQUEST = {
    "type": "object", "required": ["inputs"],
    "properties": {
        "id": {"type": "string", "description": "echoed in the response"},
        "parameters": {"type": "object", "properties": {
            "timeout": {"type": "integer", "minimum": 1, "description": "the request's deadline, in microseconds"},
            "binary_data_output": {"type": "boolean"}}},
        "inputs": {"type": "array", "minItems": 1, "maxItems": 1, "items": {
            "type": "object", "required": ["name", "datatype", "shape"],
            "properties": {
                "name": {"type": "string", "enum": [INPUT_NAME]},
                "datatype": {"type": "string", "enum": ["FP32", "BYTES"],
                             "description": "FP32 for the tensor model, BYTES for the image model"},
                "shape": {"type": "array", "minItems": 1, "maxItems": 4, "items": {"type": "integer", "minimum": 1},
                          "description": "[N, 3, 128, 128] (FP32), [N] or [N, 1] (BYTES)"},
                "parameters": {"type": "object", "properties": {"binary_data_size": {"type": "integer", "minimum": 0}}},
                "data": {"type": "array", "description": "FP32: numbers, flat or nested as the shape; BYTES: base64 "
                                                         "strings, one encoded image file each"}}}},
        "outputs": {"type": "array", "maxItems": 1, "items": {
            "type": "object", "required": ["name"],
            "properties": {
                "name": {"type": "string", "enum": [OUTPUT_NAME]},
                "parameters": {"type": "object", "properties": {
                    "classification": {"type": "integer", "minimum": 0, "maximum": 10},
                    "binary_data": {"type": "boolean"}}}}}}}}
INFER_RESPONSE = {
    "type": "object", "required": ["model_name", "model_version", "outputs"],
    "properties": {
        "model_name": {"type": "string"}, "model_version": {"type": "string"}, "id": {"type": "string"},
        "outputs": {"type": "array", "items": {
            "type": "object", "required": ["name", "datatype", "shape"],
            "properties": {"name": {"type": "string"}, "datatype": {"type": "string", "enum": ["FP32", "BYTES"]},
                           "shape": {"type": "array", "items": {"type": "integer"}},
                           "data": {"type": "array"}, "parameters": {"type": "object"}}}}}}
BINARY_FORM = {"schema": {"type": "string", "format": "binary", "minLength": 1,
                          "description": f"the JSON header ({HEADER_LENGTH} bytes), then the binary tensor data"}}
INFER_DOCS = dict(
    openapi_extra={
        "parameters": [{"name": HEADER_LENGTH, "in": "header", "required": False,
                        "schema": {"type": "integer", "minimum": 1},
                        "description": "binary tensor data extension: the length of the JSON header"}],
        "requestBody": {"required": True, "content": {"application/json": {"schema": INFER_REQUEST},
                                                      "application/octet-stream": BINARY_FORM}}},
    responses={200: {"content": {"application/json": {"schema": INFER_RESPONSE},
                                 "application/octet-stream": BINARY_FORM}},
               **error_responses(400, 401, 404, 408, 413, 429, 500, 503, 504, v2=True)},
)


@router.get("", summary="Server metadata")
async def server_metadata() -> dict:
    return inference.SERVER


@router.get("/health/live", summary="Server live", responses={503: {
    "description": "Failing", "content": {"application/json": {"schema": {
        "type": "object", "required": ["live"], "properties": {"live": {"const": False}}}}}}})
async def live(state: StateDep):
    if state.failing:
        return JSONResponse({"live": False, "error": state.not_ready_reason() or "not live"}, status_code=503)
    return {"live": True}


@router.get("/health/ready", summary="Server ready", responses=NOT_READY)
async def ready(state: StateDep):
    return _readiness(state)


def _readiness(state: ServiceState):
    """{"ready": true}, or a 503 whose body also says why in v2's error object ({"error": ...}): KServe's
    SDK raises on a 503 with that message (it shows any other body as a dict), as KServe's server answers."""
    if state.is_ready():
        return {"ready": True}
    return JSONResponse({"ready": False, "error": state.not_ready_reason() or "not ready"}, status_code=503)


@router.post("/repository/index", summary="Model repository index", dependencies=[Depends(require_api_key)],
             openapi_extra={"requestBody": {"required": False, "content": {"application/json": {"schema": {
                 "type": "object", "properties": {"ready": {"type": "boolean"}}}}}}},
             responses=error_responses(400, 401, 408, 413, v2=True))
async def repository_index(state: StateDep, request: Request) -> list[dict]:
    body = await request.body()
    header = parse_json(body) if body.strip() else {}
    if not isinstance(header, dict):
        raise BadRequest("the request must be a JSON object")
    return inference.repository_index(state, ready_only=flag(header, "ready", "the request"))


@router.get("/models/stats", summary="Statistics of both models (Triton's statistics extension)",
            responses=error_responses(404, v2=True))
@router.get("/models/{model}/stats", summary="Statistics of a model", responses=error_responses(404, v2=True))
@router.get("/models/{model}/versions/{version}/stats", include_in_schema=False)
async def model_statistics(state: StateDep, model: str | None = None, version: str | None = None) -> dict:
    # declared before /models/{model}, which would take "stats" for a model's name
    return await inference.statistics(state, model, version)


# Triton's extensions this server does not offer: 501 naming each (inference.UNSUPPORTED), not a bare 404.
UNSUPPORTED_ROUTES = [
    (["POST"], "/repository/models/{model}/load", "model_repository"),
    (["POST"], "/repository/models/{model}/unload", "model_repository"),
    (["GET", "POST"], "/trace/setting", "trace"),
    (["GET", "POST"], "/models/{model}/trace/setting", "trace"),
    (["GET", "POST"], "/logging", "logging"),
    (["GET"], "/systemsharedmemory/status", "shared_memory"),
    (["GET"], "/systemsharedmemory/region/{region}/status", "shared_memory"),
    (["POST"], "/systemsharedmemory/region/{region}/register", "shared_memory"),
    (["POST"], "/systemsharedmemory/unregister", "shared_memory"),
    (["POST"], "/systemsharedmemory/region/{region}/unregister", "shared_memory"),
    (["GET"], "/cudasharedmemory/status", "shared_memory"),
    (["GET"], "/cudasharedmemory/region/{region}/status", "shared_memory"),
    (["POST"], "/cudasharedmemory/region/{region}/register", "shared_memory"),
    (["POST"], "/cudasharedmemory/unregister", "shared_memory"),
    (["POST"], "/cudasharedmemory/region/{region}/unregister", "shared_memory"),
]


def _unsupported(extension: str):
    async def route():
        raise Unsupported(inference.UNSUPPORTED[extension])

    return route


for _methods, _path, _extension in UNSUPPORTED_ROUTES:  # before /models/{model}, which would take "stats"
    router.add_api_route(_path, _unsupported(_extension), methods=_methods, include_in_schema=False)


@router.get("/models/{model}", summary="Model metadata (with the preprocessing it expects in `parameters`)",
            responses=error_responses(404, v2=True))
@router.get("/models/{model}/versions/{version}", include_in_schema=False)
async def model_metadata(state: StateDep, model: str, version: str | None = None) -> dict:
    inference.check_model(state, model, version)
    return inference.model_metadata(state, model)


@router.get("/models/{model}/config", summary="Model configuration (Triton's ModelConfig)",
            responses=error_responses(404, v2=True))
@router.get("/models/{model}/versions/{version}/config", include_in_schema=False)
async def model_config(state: StateDep, model: str, version: str | None = None) -> dict:
    inference.check_model(state, model, version)
    return inference.model_config(state, model)


@router.get("/models/{model}/ready", summary="Model ready", responses={**error_responses(404, v2=True), **NOT_READY})
@router.get("/models/{model}/versions/{version}/ready", include_in_schema=False)
async def model_ready(state: StateDep, model: str, version: str | None = None):
    inference.check_model(state, model, version)
    return _readiness(state)


@router.post("/models/{model}/infer", summary="Inference", dependencies=[Depends(require_api_key)], **INFER_DOCS)
@router.post("/models/{model}/versions/{version}/infer", include_in_schema=False,
             dependencies=[Depends(require_api_key)])
async def infer(state: StateDep, model: str, request: Request, version: str | None = None) -> Response:
    image = inference.check_model(state, model, version)
    body = decoded_body(await request.body(), request.headers.get("content-encoding"), state.settings.max_upload_bytes)
    header, binary = split_body(body, request.headers.get(HEADER_LENGTH))
    deadline = state.deadline(request_timeout(header))
    outputs = requested_outputs(header)
    if image:
        logits = await inference.infer_images(state, read_image_input(header, binary), deadline)
    else:
        logits = await inference.infer_tensor(state, read_tensor_input(header, binary), deadline)
    return build_response(header, outputs, logits, model)


def decoded_body(body: bytes, encoding: str | None, limit: int) -> bytes:
    """The body as sent before its Content-Encoding (gzip or deflate, as tritonclient's
    request_compression_algorithm), at most `limit` bytes once decompressed; BadRequest or TooLarge."""
    encoding = (encoding or "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise BadRequest(f"Content-Encoding {encoding!r} is not supported; use gzip, deflate or none")
    data, rest = b"", body
    while True:  # a gzip body may be several members one after another (RFC 1952), as `cat a.gz b.gz`
        decompressor = zlib.decompressobj(zlib.MAX_WBITS | (16 if encoding == "gzip" else 0))
        try:
            data += decompressor.decompress(rest, limit + 1 - len(data))
        except zlib.error as exc:
            raise BadRequest(f"the body is not valid {encoding} data ({exc})") from None
        if len(data) > limit or decompressor.unconsumed_tail:
            raise TooLarge(f"the body decompresses to more than the upload limit of {limit} bytes")
        if not decompressor.eof:
            raise BadRequest(f"the body's {encoding} data is cut short")
        rest = decompressor.unused_data
        if not rest:
            return data
        if encoding != "gzip":
            raise BadRequest(f"the body has {len(rest)} bytes after the end of its deflate data")


def reject_constant(name: str):
    raise BadRequest(f"the request holds {name}: JSON numbers must be finite")


def parse_json(text: bytes):
    """The JSON value of `text`; BadRequest for invalid JSON, NaN or infinities, or nesting deeper
    than Python's parser goes (about 1,000 levels; a request needs 5)."""
    try:
        return json.loads(text, parse_constant=reject_constant)
    except ValueError as exc:  # invalid JSON or UTF-8, or an integer over Python's 4,300 digits
        if "int_max_str_digits" in str(exc):
            raise BadRequest("the request holds an integer of more than 4,300 digits") from None
        raise BadRequest(f"the request is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadRequest("the request nests arrays or objects too deeply to be a v2 request") from None


def split_body(body: bytes, header_length: str | None) -> tuple[dict, bytes]:
    """The JSON header and the binary tail (binary tensor data extension)."""
    if not body:
        raise BadRequest("the request body is empty: send a JSON inference request")
    try:
        length = int(header_length) if header_length is not None else len(body)
    except ValueError:
        raise BadRequest(f"{HEADER_LENGTH} is not an integer: {header_length!r}") from None
    if not 0 < length <= len(body):
        raise BadRequest(f"{HEADER_LENGTH} {length} does not fit a body of {len(body)} bytes")
    try:
        header = parse_json(body[:length])
    except BadRequest as exc:
        if header_length is not None or "Extra data" not in exc.message:
            raise
        raise BadRequest(f"{exc.message} (binary data after the JSON needs the {HEADER_LENGTH} header)") from None
    if not isinstance(header, dict):
        raise BadRequest("the request must be a JSON object")
    if not isinstance(header.get("id", ""), str):
        raise BadRequest(f"the request id must be a string, got {type(header['id']).__name__}")
    return header, body[length:]


def request_timeout(header: dict) -> float | None:
    """The request's `timeout` parameter (microseconds, as Triton) in seconds, or None."""
    parameters = header.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise BadRequest("the request's parameters must be a JSON object")
    timeout = parameters.get("timeout")
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int) or timeout <= 0:
        raise BadRequest(f"the timeout parameter must be a positive integer of microseconds, got {timeout!r}")
    return min(timeout, MAX_TIMEOUT_US) / 1e6  # the server's own timeout caps it anyway


def the_input(header: dict, image: bool) -> tuple[dict, int]:
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise BadRequest(f"expected exactly one input, {INPUT_NAME!r}")
    tensor = inputs[0]
    count = inference.check_tensor_input(tensor.get("name"), tensor.get("datatype"), tensor.get("shape"), image)
    return tensor, count


def binary_size(tensor: dict) -> int | None:
    parameters = tensor.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise BadRequest(f"input {INPUT_NAME!r}: parameters must be a JSON object")
    inference.check_no_shared_memory(f"input {INPUT_NAME!r}", parameters, parameters.get("shared_memory_region"))
    size = parameters.get("binary_data_size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
        raise BadRequest(f"input {INPUT_NAME!r}: binary_data_size must be a non-negative integer, got {size!r}")
    return size


def unclaimed(binary: bytes) -> None:
    """BadRequest for binary data after the JSON header that no input claims (binary_data_size)."""
    if binary:
        raise BadRequest(f"the body holds {len(binary)} bytes of binary data after the JSON header, but input "
                         f"{INPUT_NAME!r} has no binary_data_size parameter")


def flag(parameters: dict, name: str, owner: str, default: bool = False) -> bool:
    """A boolean parameter; BadRequest for anything but true or false (the string "false" is not false)."""
    value = parameters.get(name, default)
    if not isinstance(value, bool):
        raise BadRequest(f"{owner}: parameter {name} must be true or false, got {value!r}")
    return value


def read_tensor_input(header: dict, binary: bytes) -> np.ndarray:
    """The FP32 `image` tensor of a request, checked against its declared name, datatype and shape."""
    tensor, _ = the_input(header, image=False)
    shape = tensor["shape"]
    count = math.prod(shape)  # exact: np.prod wraps around past 2**63
    size = binary_size(tensor)
    if size is not None:
        if size != count * 4 or len(binary) != size:
            raise BadRequest(f"input {INPUT_NAME!r} {shape} needs {count * 4} bytes of FP32, "
                             f"binary_data_size says {size} and the body has {len(binary)}")
        return np.frombuffer(binary, dtype="<f4").reshape(shape)
    unclaimed(binary)
    data = tensor.get("data")
    if data is None:
        raise BadRequest(f"input {INPUT_NAME!r} has neither data nor binary_data_size")
    try:
        numbers = np.asarray(data)
    except ValueError:  # ragged lists
        raise BadRequest(f"input {INPUT_NAME!r} data is not a (nested) list of numbers") from None
    # JSON strings, booleans and nulls are not FP32 values (numpy would read "0.5" and true as numbers).
    if numbers.dtype.kind not in "iuf" or among_numbers(data, numbers):
        kind = "b" if numbers.dtype.kind in "iuf" else numbers.dtype.kind
        raise BadRequest(f"input {INPUT_NAME!r} data must be JSON numbers; it holds "
                         f"{NON_NUMBERS.get(kind, 'values that are not')}")
    with np.errstate(over="ignore"):  # values beyond float32 become inf, refused as non-finite
        array = numbers.astype(np.float32).reshape(-1)
    if array.size != count:
        raise BadRequest(f"input {INPUT_NAME!r} {shape} needs {count} values, got {array.size}")
    return array.reshape(shape)


def among_numbers(data, numbers: np.ndarray) -> bool:
    """Whether JSON true or false sits among the numbers of `data` (numpy read them as 1 and 0): looked
    for only where `numbers` holds a 0 or a 1, so that a batch of other values costs one comparison."""
    ones_or_zeros = ((numbers == 0) | (numbers == 1)).reshape(-1)
    if not ones_or_zeros.any():
        return False
    values = np.asarray(data, dtype=object).reshape(-1)[ones_or_zeros]
    return any(isinstance(value, bool) for value in values)


def read_image_input(header: dict, binary: bytes) -> list[bytes]:
    """The encoded image files of a BYTES `image` input: binary, or a JSON list of base64 strings."""
    tensor, count = the_input(header, image=True)
    size = binary_size(tensor)
    if size is not None:
        if len(binary) != size:
            raise BadRequest(f"input {INPUT_NAME!r}: binary_data_size says {size}, the body has {len(binary)} bytes")
        return inference.unpack_bytes(binary, count)
    unclaimed(binary)
    data = tensor.get("data")
    if isinstance(data, list) and data and all(isinstance(e, list) and len(e) == 1 for e in data):
        data = [e[0] for e in data]  # nested as the shape [N, 1] is (KServe v2 JSON may nest or not)
    if not isinstance(data, list) or len(data) != count:
        raise BadRequest(f"input {INPUT_NAME!r}: data must be a list of {count} base64 strings (one image file each)")
    files = []
    for index, element in enumerate(data):
        if not isinstance(element, str):
            raise BadRequest(f"input {INPUT_NAME!r} element {index}: not a base64 string")
        try:
            files.append(base64.b64decode(element, validate=True))
        except (binascii.Error, ValueError):
            raise BadRequest(f"input {INPUT_NAME!r} element {index}: not valid base64") from None
    return files


def requested_outputs(header: dict) -> list[tuple[int, bool]]:
    """(classification count, binary) of each requested output; BadRequest before any inference."""
    requested = header.get("outputs") or [{"name": OUTPUT_NAME}]
    if not isinstance(requested, list):
        raise BadRequest("outputs must be a list")
    parameters = header.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise BadRequest("the request's parameters must be a JSON object")
    binary_default = flag(parameters, "binary_data_output", "the request")
    outputs = []
    for spec in requested:
        if not isinstance(spec, dict) or spec.get("name") != OUTPUT_NAME:
            name = spec.get("name") if isinstance(spec, dict) else spec
            raise BadRequest(f"unknown output {name!r}; the model gives {OUTPUT_NAME!r}")
        params = spec.get("parameters") or {}
        if not isinstance(params, dict):
            raise BadRequest(f"output {OUTPUT_NAME!r}: parameters must be a JSON object")
        inference.check_no_shared_memory(f"output {OUTPUT_NAME!r}", params, params.get("shared_memory_region"))
        outputs.append((inference.classification_count(params.get("classification", 0)),
                        flag(params, "binary_data", f"output {OUTPUT_NAME!r}", binary_default)))
    inference.check_requested_once(len(outputs))
    return outputs


def build_response(header: dict, requested: list[tuple[int, bool]], logits: np.ndarray, model: str) -> Response:
    outputs, blobs = [], []
    for k, binary in requested:
        strings = inference.classification(logits, k)
        if strings is not None:
            entry = {"name": OUTPUT_NAME, "datatype": "BYTES", "shape": [len(logits), len(strings[0])]}
            flat = [s for row in strings for s in row]
            blob = inference.pack_bytes([s.encode() for s in flat])
        else:
            entry = {"name": OUTPUT_NAME, "datatype": "FP32", "shape": list(logits.shape)}
            flat = logits.reshape(-1).tolist()
            blob = logits.astype("<f4").tobytes()
        if binary:
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = flat
        outputs.append(entry)
    body = {"model_name": model, "model_version": inference.VERSION, "outputs": outputs}
    if "id" in header:
        body["id"] = header["id"]
    text = json.dumps(body).encode()
    if not blobs:
        return Response(text, media_type="application/json")
    return Response(text + b"".join(blobs), media_type="application/octet-stream", headers={HEADER_LENGTH: str(len(text))})
