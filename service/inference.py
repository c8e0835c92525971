"""The two KServe v2 models this service serves, whatever the protocol (HTTP: service/api/v2.py,
gRPC: service/kserve_grpc/server.py): their metadata and configuration, the checks of their inputs, and
their inference through the one batcher.

* `alexnet_acmix` (the model name setting): input `image` FP32 [N, 3, 128, 128], preprocessed as
  PREPROCESSING says; output `logits` FP32 [N, 10].
* `alexnet_acmix_image`: input `image` BYTES [N], each element one encoded image file (JPEG, PNG,
  WebP, BMP, GIF), decoded and preprocessed by the service with model/preprocessing.py, under the
  same pixel and size limits as /predict; the same output.

Both offer Triton's classification extension on `logits` (raw logits: "value:index:label").
"""

from __future__ import annotations

import asyncio
import time

import numpy as np

from model import preprocessing
from model.preprocessing import ImageError
from model.spec import CLASSES, INPUT_NAME, INPUT_SHAPE, NUM_CLASSES, OUTPUT_NAME
from service.errors import BadRequest, DeadlineExceeded, InferenceFailed, NotFound, Overloaded, Unavailable
from service.predictions import classification_strings
from service.request_log import current
from service.state import ServiceState

VERSION = "1"
SERVER = {"name": "alexnet-acmix-service", "version": "0.1.0", "extensions": ["binary_tensor_data", "classification"]}

# The preprocessing the tensor model expects, published in its metadata and config `parameters`.
PREPROCESSING = preprocessing.CONTRACT
# Preprocessed values lie in [(0 - 0.485) / 0.229, (1 - 0.406) / 0.225] = [-2.12, 2.64]; a tensor
# reaching beyond +-LIMIT is not preprocessed (raw 0-255 values reach 255). Resampling other
# than bilinear may overshoot the range a little, hence the margin.
PREPROCESSED_LIMIT = 3.0


def model_names(state: ServiceState) -> tuple[str, str]:
    return state.settings.model_names()


def check_model(state: ServiceState, model: str, version: str | None = None) -> bool:
    """True for the image model, False for the tensor model; NotFound for anything else."""
    tensor, image = model_names(state)
    if model not in (tensor, image):
        raise NotFound(f"unknown model {model!r}; this server serves {tensor!r} and {image!r}")
    if version not in (None, "", VERSION):
        raise NotFound(f"unknown version {version!r} of {model!r}; available: {VERSION}")
    return model == image


def repository_index(state: ServiceState, ready_only: bool = False) -> list[dict]:
    """Triton's model repository extension, the index: both models, version 1, READY or UNAVAILABLE."""
    ready = state.is_ready()
    if ready_only and not ready:
        return []
    return [{"name": name, "version": VERSION, "state": "READY" if ready else "UNAVAILABLE",
             **({} if ready else {"reason": state.not_ready_reason() or "not ready"})} for name in model_names(state)]


async def statistics(state: ServiceState, model: str | None = None, version: str | None = None) -> dict:
    """Triton's statistics of `model` (both where None), as JSON; NotFound for another model or version.
    Read in a thread: with several server processes they are summed from every process's files
    (service/statistics.py), milliseconds the event loop need not wait."""
    if model is None and version:
        raise NotFound("a version needs a model")
    if model is not None:
        check_model(state, model, version)
    models = [model] if model else list(model_names(state))
    return await asyncio.to_thread(state.statistics.as_json, models, VERSION)


# Triton extensions this server does not offer, and what to use instead; the HTTP routes and gRPC
# methods of each answer 501 / UNIMPLEMENTED with this (service/api/v2.py, service/kserve_grpc/server.py).
UNSUPPORTED = {
    "model_repository": "loading and unloading models is not supported; this server serves its two models from start",
    "trace": "the trace extension is not supported; requests carry W3C traceparent and X-Request-ID instead",
    "logging": "the logging extension is not supported; set ACMIX_LOG_LEVEL",
    "shared_memory": "the shared-memory extensions are not supported; send tensors in the request (binary data)",
}


# The parameters by which an input or output of Triton's shared-memory extensions names its region.
SHARED_MEMORY_PARAMETERS = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")


def check_no_shared_memory(owner: str, parameters, region: str | None) -> None:
    """BadRequest where an input or output (`owner`) names a shared-memory region (`region`, the
    shared_memory_region parameter's value), which this server does not offer (both protocols;
    Triton answers a region it does not know with INVALID_ARGUMENT). Ignored, such an output would
    come back in the response where the client reads its region, and such an input be empty."""
    named = [name for name in SHARED_MEMORY_PARAMETERS if name in parameters]
    if named:
        what = f"shared memory region {region!r}" if region is not None else f"shared memory ({named[0]})"
        raise BadRequest(f"{owner} names {what}: {UNSUPPORTED['shared_memory']}")


def platform_name(state: ServiceState) -> str:
    return "tensorrt_plan" if state.backend_name == "tensorrt" else "onnxruntime_onnx"


def model_metadata(state: ServiceState, model: str) -> dict:
    """v2 model metadata (HTTP JSON and gRPC alike); `parameters` only on HTTP (gRPC has no field)."""
    image = check_model(state, model)
    tensor_input = {"name": INPUT_NAME, "datatype": "BYTES", "shape": [-1]} if image else \
        {"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, *INPUT_SHAPE]}
    return {
        "name": model,
        "versions": [VERSION],
        "platform": platform_name(state),
        "inputs": [tensor_input],
        "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, NUM_CLASSES]}],
        "parameters": model_parameters(state, image),
    }


def model_parameters(state: ServiceState, image: bool) -> dict[str, str]:
    parameters = {"model_digest": state.model_digest, "labels": ",".join(CLASSES),
                  "softmax_temperature": f"{state.temperature:.6g}"}
    if image:
        parameters.update(input="encoded image files (JPEG, PNG, WebP, BMP, GIF), one per element",
                          max_image_pixels=str(state.settings.max_image_pixels))
    else:
        parameters.update({f"preprocessing_{key}": value for key, value in PREPROCESSING.items()})
    return parameters


def model_config(state: ServiceState, model: str) -> dict:
    """Triton's ModelConfig as JSON (its field names): the same values over HTTP and gRPC."""
    image = check_model(state, model)
    settings = state.settings
    return {
        "name": model,
        "platform": platform_name(state),
        "backend": "tensorrt" if state.backend_name == "tensorrt" else "onnxruntime",
        "max_batch_size": settings.max_batch_size,
        # One encoded file per image: in Triton's terms an element of dims [1] reshaped to a scalar,
        # so that [N] (the metadata's shape) and [N, 1] (what the dims alone say) are both taken.
        "input": [{"name": INPUT_NAME, "data_type": "TYPE_STRING", "dims": [1], "reshape": {"shape": []}} if image
                  else {"name": INPUT_NAME, "data_type": "TYPE_FP32", "dims": list(INPUT_SHAPE)}],
        "output": [{"name": OUTPUT_NAME, "data_type": "TYPE_FP32", "dims": [NUM_CLASSES]}],
        "dynamic_batching": {"preferred_batch_size": [settings.max_batch_size],
                             "max_queue_delay_microseconds": int(settings.max_queue_delay_ms * 1000)},
        "instance_group": [{"name": model, "count": 1,
                            "kind": "KIND_GPU" if state.backend_name == "tensorrt" else "KIND_CPU"}],
        "parameters": {key: {"string_value": value} for key, value in model_parameters(state, image).items()},
    }


def check_tensor_input(name: str, datatype: str, shape: list, image: bool) -> int:
    """The batch size of a well-declared input; BadRequest naming what is wrong."""
    if name != INPUT_NAME:
        raise BadRequest(f"unexpected input {name!r}; the model takes {INPUT_NAME!r}")
    want = "BYTES" if image else "FP32"
    if datatype != want:
        raise BadRequest(f"input {INPUT_NAME!r} must be {want}, got {datatype!r}")
    if not isinstance(shape, list | tuple) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise BadRequest(f"input {INPUT_NAME!r} has no valid shape: {shape!r}")
    shape = list(shape)
    if image:
        if len(shape) not in (1, 2) or shape[1:] not in ([], [1]) or shape[0] < 1:
            raise BadRequest(f"input {INPUT_NAME!r} must have shape [N] or [N, 1] with N >= 1, got {shape}")
        return shape[0]
    if len(shape) != 4 or tuple(shape[1:]) != INPUT_SHAPE or shape[0] < 1:
        raise BadRequest(f"input {INPUT_NAME!r} must have shape [N, 3, 128, 128] with N >= 1, got {shape}")
    return shape[0]


def check_preprocessed(batch: np.ndarray, image_model: str) -> None:
    """BadRequest for non-finite values and for tensors that are plainly not preprocessed."""
    if not np.isfinite(batch).all():
        raise BadRequest(f"input {INPUT_NAME!r} holds NaN or infinite values (a number beyond FP32's ±3.4e38 is infinite in FP32)")
    low, high = float(batch.min()), float(batch.max())
    if low < -PREPROCESSED_LIMIT or high > PREPROCESSED_LIMIT:
        raise BadRequest(
            f"input {INPUT_NAME!r} spans {low:.4g}..{high:.4g}: that is not a preprocessed image (raw 0-255 values?). "
            f"Preprocess as the model's metadata says: RGB, resize to 128x128 (bilinear), (value / 255 - mean) / std "
            f"with mean {PREPROCESSING['mean']} and std {PREPROCESSING['std']}, NCHW; or send the image files "
            f"themselves to the model {image_model!r} (input {INPUT_NAME!r}, BYTES)")


def check_batch_size(state: ServiceState, count: int) -> None:
    if count > state.settings.max_queue_size:
        raise BadRequest(f"{count} images exceed the queue size {state.settings.max_queue_size}")


def failure_reason(exc: BaseException) -> str:
    """Triton's reason for a failed request (its nv_inference_request_failure label): REJECTED where
    the server refused it or its deadline passed (queue full, draining: Triton's queue timeouts are
    REJECTED too), CANCELED where its client went, BACKEND where its batch failed, else OTHER."""
    if isinstance(exc, Overloaded | Unavailable | DeadlineExceeded):
        return "REJECTED"
    if isinstance(exc, asyncio.CancelledError):
        return "CANCELED"
    return "BACKEND" if isinstance(exc, InferenceFailed) else "OTHER"


async def counted(state: ServiceState, model: str, count: int, compute) -> np.ndarray:
    """The logits `compute()` returns (with the seconds spent preparing its inputs), counted in the
    model's statistics (service/statistics.py): a success with its timings, or a failure."""
    started = time.perf_counter()
    try:
        logits, input_s = await compute()
    except BaseException as exc:
        state.statistics.failed(model, time.perf_counter() - started, failure_reason(exc))
        raise
    record = current.get()
    state.statistics.succeeded(model, count, time.perf_counter() - started, record.queue_s if record else 0.0,
                               record.infer_s if record else 0.0, input_s)
    return logits


async def infer_tensor(state: ServiceState, batch: np.ndarray, deadline: float) -> np.ndarray:
    """Logits [N, 10] of a preprocessed float32 [N, 3, 128, 128] batch, one request per image."""
    tensor_model, image_model = model_names(state)

    async def compute():
        check_batch_size(state, len(batch))
        check_preprocessed(batch, image_model)
        return await state.logits(list(batch), deadline, tensor_model), 0.0

    return await counted(state, tensor_model, len(batch), compute)


async def infer_images(state: ServiceState, files: list[bytes], deadline: float) -> np.ndarray:
    """Logits [N, 10] of encoded image files; BadRequest naming the index of the first bad one."""
    image_model = model_names(state)[1]

    async def compute():
        check_batch_size(state, len(files))
        started = time.perf_counter()
        images = []
        for index, data in enumerate(files):
            if len(data) > state.settings.max_upload_bytes:
                raise BadRequest(f"input {INPUT_NAME!r} element {index}: {len(data)} bytes, over the upload limit "
                                 f"of {state.settings.max_upload_bytes}")
            try:
                images.append(await state.decode(data, deadline))
            except ImageError as exc:
                raise BadRequest(f"input {INPUT_NAME!r} element {index}: {exc}") from None
        decoded_s = time.perf_counter() - started
        return await state.logits(images, deadline, image_model), decoded_s

    return await counted(state, image_model, len(files), compute)


def classification_count(k) -> int:
    """Triton's classification extension: `k` classes per image (0: none); BadRequest for a bad k.
    Checked with the rest of the request, before inference."""
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= NUM_CLASSES:
        raise BadRequest(f"classification must be an integer in 0..{NUM_CLASSES}, got {k!r}")
    return k


def check_requested_once(times: int) -> None:
    """BadRequest where a request names the model's one output more than once (both protocols,
    before inference)."""
    if times > 1:
        raise BadRequest(f"output {OUTPUT_NAME!r} is requested {times} times; request it once")


def classification(logits: np.ndarray, k: int) -> list[list[str]] | None:
    """The classification strings of `k` (checked by classification_count) classes per image, or None for 0."""
    return classification_strings(logits, k) if k else None


def pack_bytes(elements: list[bytes]) -> bytes:
    """Triton's binary form of a BYTES tensor: each element a 4-byte little-endian length, then its bytes."""
    return b"".join(len(e).to_bytes(4, "little") + e for e in elements)


def unpack_bytes(blob: bytes, count: int) -> list[bytes]:
    """The elements of a binary BYTES tensor; BadRequest where the blob does not hold `count` of them."""
    elements, offset = [], 0
    while offset < len(blob):
        if offset + 4 > len(blob):
            raise BadRequest(f"input {INPUT_NAME!r}: BYTES data ends inside the length of element {len(elements)}")
        size = int.from_bytes(blob[offset : offset + 4], "little")
        offset += 4
        if offset + size > len(blob):
            raise BadRequest(f"input {INPUT_NAME!r} element {len(elements)}: its length {size} runs past the data")
        elements.append(blob[offset : offset + size])
        offset += size
    if len(elements) != count:
        raise BadRequest(f"input {INPUT_NAME!r}: shape [{count}] but the BYTES data holds {len(elements)} elements")
    return elements
