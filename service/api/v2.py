"""KServe v2 / Open Inference Protocol over REST, with the binary tensor data and classification
extensions, as Triton serves them: standard clients (tritonclient.http) work unchanged.

Input `image` FP32 [N, 3, 128, 128] (preprocessed, model/preprocessing.py), output `logits`
FP32 [N, 10]; `"classification": k` on the output returns BYTES [N, k] "value:index:label".
"""

from __future__ import annotations

import asyncio
import json
import struct

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from model.spec import INPUT_NAME, INPUT_SHAPE, NUM_CLASSES, OUTPUT_NAME
from service.api.security import require_api_key
from service.errors import BadRequest, NotFound
from service.predictions import classification_strings
from service.state import ServiceState, StateDep

router = APIRouter(prefix="/v2", tags=["kserve-v2"])
HEADER_LENGTH = "Inference-Header-Content-Length"
VERSION = "1"


def check_model(state: ServiceState, model: str, version: str | None = None) -> None:
    if model != state.settings.model_name:
        raise NotFound(f"unknown model {model!r}; this server serves {state.settings.model_name!r}")
    if version not in (None, "", VERSION):
        raise NotFound(f"unknown version {version!r} of {model!r}; available: {VERSION}")


@router.get("", summary="Server metadata")
async def server_metadata() -> dict:
    return {"name": "alexnet-acmix-service", "version": "0.1.0", "extensions": ["binary_tensor_data", "classification"]}


@router.get("/health/live", summary="Server live")
async def live() -> dict:
    return {"live": True}


@router.get("/health/ready", summary="Server ready")
async def ready(state: StateDep):
    return _readiness(state)


def _readiness(state: ServiceState):
    if state.ready and not state.draining:
        return {"ready": True}
    return JSONResponse({"ready": False}, status_code=503)


@router.get("/models/{model}", summary="Model metadata")
@router.get("/models/{model}/versions/{version}", include_in_schema=False)
async def model_metadata(state: StateDep, model: str, version: str | None = None) -> dict:
    check_model(state, model, version)
    platform = "tensorrt_plan" if state.backend_name == "tensorrt" else "onnxruntime_onnx"
    return {
        "name": model,
        "versions": [VERSION],
        "platform": platform,
        "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, *INPUT_SHAPE]}],
        "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, NUM_CLASSES]}],
    }


@router.get("/models/{model}/ready", summary="Model ready")
@router.get("/models/{model}/versions/{version}/ready", include_in_schema=False)
async def model_ready(state: StateDep, model: str, version: str | None = None):
    check_model(state, model, version)
    return _readiness(state)


@router.post("/models/{model}/infer", summary="Inference", dependencies=[Depends(require_api_key)])
@router.post("/models/{model}/versions/{version}/infer", include_in_schema=False,
             dependencies=[Depends(require_api_key)])
async def infer(state: StateDep, model: str, request: Request, version: str | None = None) -> Response:
    check_model(state, model, version)
    header, binary = split_body(await request.body(), request.headers.get(HEADER_LENGTH))
    batch = read_input(header, binary)
    if len(batch) > state.settings.max_queue_size:
        raise BadRequest(f"{len(batch)} images exceed the queue size {state.settings.max_queue_size}")
    deadline = state.deadline()
    rows = await asyncio.gather(*(state.logits(image, deadline) for image in batch))
    return build_response(header, np.stack(rows).astype(np.float32), model)


def split_body(body: bytes, header_length: str | None) -> tuple[dict, bytes]:
    """The JSON header and the binary tail (binary tensor data extension)."""
    try:
        length = int(header_length) if header_length is not None else len(body)
    except ValueError:
        raise BadRequest(f"{HEADER_LENGTH} is not an integer: {header_length!r}") from None
    if not 0 < length <= len(body):
        raise BadRequest(f"{HEADER_LENGTH} {length} does not fit a body of {len(body)} bytes")
    try:
        header = json.loads(body[:length])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"the request header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise BadRequest("the request must be a JSON object")
    return header, body[length:]


def read_input(header: dict, binary: bytes) -> np.ndarray:
    """The `image` tensor of a request, checked against its declared name, datatype and shape."""
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise BadRequest(f"expected exactly one input, {INPUT_NAME!r}")
    tensor = inputs[0]
    if tensor.get("name") != INPUT_NAME:
        raise BadRequest(f"unexpected input {tensor.get('name')!r}; the model takes {INPUT_NAME!r}")
    if tensor.get("datatype") != "FP32":
        raise BadRequest(f"input {INPUT_NAME!r} must be FP32, got {tensor.get('datatype')!r}")
    shape = tensor.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) != 4
        or not all(isinstance(d, int) for d in shape)
        or tuple(shape[1:]) != INPUT_SHAPE
        or shape[0] < 1
    ):
        raise BadRequest(f"input {INPUT_NAME!r} must have shape [N, 3, 128, 128] with N >= 1, got {shape}")
    count = int(np.prod(shape))
    size = (tensor.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        if size != count * 4 or len(binary) != size:
            raise BadRequest(f"input {INPUT_NAME!r} {shape} needs {count * 4} bytes of FP32, "
                     f"binary_data_size says {size} and the body has {len(binary)}"
            )
        return np.frombuffer(binary, dtype="<f4").reshape(shape)
    data = tensor.get("data")
    if data is None:
        raise BadRequest(f"input {INPUT_NAME!r} has neither data nor binary_data_size")
    try:
        array = np.asarray(data, dtype=np.float32).reshape(-1)
    except (TypeError, ValueError):
        raise BadRequest(f"input {INPUT_NAME!r} data is not a (nested) list of numbers") from None
    if array.size != count:
        raise BadRequest(f"input {INPUT_NAME!r} {shape} needs {count} values, got {array.size}")
    return array.reshape(shape)


def build_response(header: dict, logits: np.ndarray, model: str) -> Response:
    requested = header.get("outputs") or [{"name": OUTPUT_NAME}]
    binary_default = bool((header.get("parameters") or {}).get("binary_data_output", False))
    outputs, blobs = [], []
    for spec in requested:
        if not isinstance(spec, dict) or spec.get("name") != OUTPUT_NAME:
            name = spec.get("name") if isinstance(spec, dict) else spec
            raise BadRequest(f"unknown output {name!r}; the model gives {OUTPUT_NAME!r}")
        params = spec.get("parameters") or {}
        k = params.get("classification", 0)
        if not isinstance(k, int) or not 0 <= k <= NUM_CLASSES:
            raise BadRequest(f"classification must be an integer in 0..{NUM_CLASSES}, got {k!r}")
        if k:
            strings = classification_strings(logits, k)
            entry = {"name": OUTPUT_NAME, "datatype": "BYTES", "shape": [len(logits), k]}
            flat = [s for row in strings for s in row]
            blob = b"".join(struct.pack("<I", len(s.encode())) + s.encode() for s in flat)
        else:
            entry = {"name": OUTPUT_NAME, "datatype": "FP32", "shape": list(logits.shape)}
            flat = logits.reshape(-1).tolist()
            blob = logits.astype("<f4").tobytes()
        if params.get("binary_data", binary_default):
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = flat
        outputs.append(entry)
    body = {"model_name": model, "model_version": VERSION, "outputs": outputs}
    if "id" in header:
        body["id"] = header["id"]
    text = json.dumps(body).encode()
    if not blobs:
        return Response(text, media_type="application/json")
    return Response(
        text + b"".join(blobs),
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(text))},
    )
