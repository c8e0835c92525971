"""The KServe v2 gRPC API (GRPCInferenceService), in the service's process and event loop.

Served on ACMIX_GRPC_PORT (default 8001, as Triton; 0: off) by grpc.aio, started and stopped by
the app's lifespan, so it shares the batcher, the backend and the settings with HTTP: the models
and their checks are service/inference.py's. tritonclient.grpc works unchanged: ServerLive,
ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelConfig, ModelInfer (inputs in
`raw_input_contents` or typed `contents`; outputs in `raw_output_contents`, as Triton sends them;
the classification extension), ModelStreamInfer, ModelStatistics and RepositoryIndex; Triton's
other RPCs answer UNIMPLEMENTED naming their extension.

The service's domain errors become gRPC status codes (service/errors.py); every call carries
`x-request-id` and `x-model-digest` in its trailing metadata, counts in the metrics by method
and code, and logs one line (service/request_log.py). Messages up to the upload limit are taken.
"""

from __future__ import annotations

import asyncio
import secrets
import time

import grpc
import numpy as np
from google.protobuf import json_format

from model.spec import INPUT_NAME, INPUT_SHAPE, OUTPUT_NAME
from service import inference
from service.errors import BadRequest, NotFound, ServiceError, Unauthenticated, Unavailable, Unsupported
from service.kserve_grpc.proto import kserve_v2_pb2 as pb
from service.request_log import (
    MODEL_DIGEST,
    REQUEST_ID,
    TRACEPARENT,
    RequestRecord,
    current,
    log,
    request_id,
    traceparent,
)
from service.settings import GRPC_MESSAGE_OVERHEAD
from service.state import ServiceState

SERVICE = "inference.GRPCInferenceService"  # the protocol's name: the gRPC method paths use it
IMAGE_ELEMENTS = int(np.prod(INPUT_SHAPE))


class Servicer:
    """One method per RPC: (request, metadata dict) -> response, or a ServiceError."""

    def __init__(self, state: ServiceState):
        self.state = state

    async def ServerLive(self, request, metadata):  # noqa: N802 (the protocol's method names)
        return pb.ServerLiveResponse(live=not self.state.failing)

    async def ServerReady(self, request, metadata):  # noqa: N802
        return pb.ServerReadyResponse(ready=self.state.is_ready())

    async def ModelReady(self, request, metadata):  # noqa: N802
        try:
            inference.check_model(self.state, request.name, request.version)
        except NotFound:  # as Triton: an unknown model or version is not ready, not an error
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=self.state.is_ready())

    async def RepositoryIndex(self, request, metadata):  # noqa: N802
        require_key(self.state, metadata)
        models = inference.repository_index(self.state, ready_only=request.ready)
        return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(**m) for m in models])

    async def ModelStatistics(self, request, metadata):  # noqa: N802
        statistics = inference.statistics(self.state, request.name or None, request.version or None)
        return json_format.ParseDict(statistics, pb.ModelStatisticsResponse(), ignore_unknown_fields=True)

    async def ServerMetadata(self, request, metadata):  # noqa: N802
        return pb.ServerMetadataResponse(**inference.SERVER)

    async def ModelMetadata(self, request, metadata):  # noqa: N802
        inference.check_model(self.state, request.name, request.version)
        described = inference.model_metadata(self.state, request.name)
        tensors = {key: [pb.ModelMetadataResponse.TensorMetadata(**t) for t in described[key]]
                   for key in ("inputs", "outputs")}
        return pb.ModelMetadataResponse(name=described["name"], versions=described["versions"],
                                        platform=described["platform"], **tensors)

    async def ModelConfig(self, request, metadata):  # noqa: N802
        inference.check_model(self.state, request.name, request.version)
        config = inference.model_config(self.state, request.name)
        message = pb.ModelConfig(
            name=config["name"], platform=config["platform"], backend=config["backend"],
            max_batch_size=config["max_batch_size"],
            input=[pb.ModelInput(name=t["name"], data_type=t["data_type"], dims=t["dims"]) for t in config["input"]],
            output=[pb.ModelOutput(name=t["name"], data_type=t["data_type"], dims=t["dims"]) for t in config["output"]],
            instance_group=[pb.ModelInstanceGroup(**g) for g in config["instance_group"]],
            dynamic_batching=pb.ModelDynamicBatching(**config["dynamic_batching"]),
            parameters={k: pb.ModelParameter(string_value=v["string_value"]) for k, v in config["parameters"].items()},
        )
        return pb.ModelConfigResponse(config=message)

    async def ModelInfer(self, request, metadata):  # noqa: N802
        state = self.state
        require_key(state, metadata)  # first: without the key, not even whether the model exists
        image = inference.check_model(state, request.model_name, request.model_version)
        if state.draining:  # new calls stop at SIGTERM; those in flight finish
            raise Unavailable("the service is draining")
        if len(request.inputs) != 1:
            raise BadRequest(f"expected exactly one input, {INPUT_NAME!r}")
        tensor = request.inputs[0]
        count = inference.check_tensor_input(tensor.name, tensor.datatype, list(tensor.shape), image)
        raw = list(request.raw_input_contents)
        if len(raw) > 1:
            raise BadRequest(f"raw_input_contents holds {len(raw)} tensors; the model takes one")
        deadline = state.deadline(timeout_parameter(request.parameters, metadata))
        outputs = requested_outputs(request)
        if image:
            if raw:
                files = inference.unpack_bytes(raw[0], count)
            else:
                files = list(tensor.contents.bytes_contents)
                if len(files) != count:
                    raise BadRequest(f"input {INPUT_NAME!r}: shape [{count}] but bytes_contents holds {len(files)}")
            logits = await inference.infer_images(state, files, deadline)
        else:
            values = count * IMAGE_ELEMENTS
            if raw:
                if len(raw[0]) != values * 4:
                    raise BadRequest(f"input {INPUT_NAME!r} {list(tensor.shape)} needs {values * 4} bytes of FP32, "
                                     f"raw_input_contents has {len(raw[0])}")
                batch = np.frombuffer(raw[0], dtype="<f4")
            else:
                batch = np.asarray(tensor.contents.fp32_contents, dtype=np.float32)
                if batch.size != values:
                    raise BadRequest(f"input {INPUT_NAME!r} {list(tensor.shape)} needs {values} values, "
                                     f"fp32_contents has {batch.size}")
            logits = await inference.infer_tensor(state, batch.reshape(count, *INPUT_SHAPE), deadline)
        return infer_response(request, outputs, logits)


def require_key(state: ServiceState, metadata: dict[str, str]) -> None:
    expected = state.settings.api_key
    if not expected:
        return
    given = metadata.get("x-api-key") or metadata.get("authorization", "").removeprefix("Bearer ").strip() or None
    if given is None or not secrets.compare_digest(given.encode(), expected.encode()):
        raise Unauthenticated("missing or wrong API key (metadata x-api-key)")


def timeout_parameter(parameters, metadata) -> float | None:
    """The request's `timeout` parameter (microseconds, as Triton) in seconds, or None."""
    if "timeout" not in parameters:
        return None
    choice = parameters["timeout"].WhichOneof("parameter_choice")
    value = getattr(parameters["timeout"], choice) if choice else None
    if choice not in ("int64_param", "uint64_param") or value <= 0:
        raise BadRequest(f"the timeout parameter must be a positive integer of microseconds, got {value!r}")
    return value / 1e6


def requested_outputs(request) -> list[int]:
    """The classification count of each requested output; BadRequest before any inference."""
    requested = list(request.outputs) or [pb.ModelInferRequest.InferRequestedOutputTensor(name=OUTPUT_NAME)]
    counts = []
    for spec in requested:
        if spec.name != OUTPUT_NAME:
            raise BadRequest(f"unknown output {spec.name!r}; the model gives {OUTPUT_NAME!r}")
        k = 0
        if "classification" in spec.parameters:
            parameter = spec.parameters["classification"]
            choice = parameter.WhichOneof("parameter_choice")
            k = getattr(parameter, choice) if choice in ("int64_param", "uint64_param") else None
        counts.append(inference.classification_count(k))
    inference.check_requested_once(len(counts))
    return counts


def infer_response(request, outputs: list[int], logits: np.ndarray):
    response = pb.ModelInferResponse(model_name=request.model_name, model_version=inference.VERSION, id=request.id)
    for k in outputs:
        strings = inference.classification(logits, k)
        if strings is not None:
            response.outputs.add(name=OUTPUT_NAME, datatype="BYTES", shape=[len(logits), len(strings[0])])
            response.raw_output_contents.append(inference.pack_bytes([s.encode() for row in strings for s in row]))
        else:
            response.outputs.add(name=OUTPUT_NAME, datatype="FP32", shape=list(logits.shape))
            response.raw_output_contents.append(logits.astype("<f4").tobytes())
    return response


def metadata_of(context) -> dict[str, str]:
    return {key.lower(): value for key, value in context.invocation_metadata() or () if isinstance(value, str)}


async def answer(state: ServiceState, name: str, method, request, metadata: dict, record: RequestRecord):
    """(response, OK, "") of `method` on one request, or (None, status code, message): errors as
    status codes, the request's record in context, metrics and, for inference, the log line."""
    token = current.set(record)
    code, message = grpc.StatusCode.OK, ""
    try:
        return await method(request, metadata), code, message
    except ServiceError as exc:
        code, message = getattr(grpc.StatusCode, exc.grpc_code), exc.message
    except TimeoutError:
        code, message = grpc.StatusCode.DEADLINE_EXCEEDED, "no result before the request's deadline"
    except asyncio.CancelledError:  # the client cancelled, or its deadline passed: counted as such
        code = grpc.StatusCode.CANCELLED
        raise
    except Exception as exc:  # a bug, not the request's fault: logged, INTERNAL to the caller
        code, message = grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}"
        log.exception("gRPC %s failed", name)
    finally:
        # Counted before the status is sent: a caller that reads /metrics on seeing it finds it counted.
        current.reset(token)
        state.metrics.grpc_requests.labels(name, code.name).inc()
        if name in ("ModelInfer", "ModelStreamInfer"):
            log.info(record.line(code.name))
    return None, code, message


def handler(state: ServiceState, name: str, method, request_type=None, response_type=None):
    """A unary RPC over `method` (request and response as bytes where no type is given)."""

    async def call(request, context: grpc.aio.ServicerContext):
        metadata = metadata_of(context)
        record = RequestRecord(request_id(metadata.get(REQUEST_ID)), f"grpc {name}", traceparent(metadata.get(TRACEPARENT)))
        trailing = [(REQUEST_ID, record.request_id)]
        if state.model_digest:
            trailing.append((MODEL_DIGEST, state.model_digest[:12]))
        context.set_trailing_metadata(trailing)
        response, code, message = await answer(state, name, method, request, metadata, record)
        if response is None:
            await context.abort(code, message)
        return response

    return grpc.unary_unary_rpc_method_handler(
        call, request_deserializer=request_type.FromString if request_type else None,
        response_serializer=response_type.SerializeToString if response_type else None)


def stream_handler(state: ServiceState, servicer: Servicer):
    """ModelStreamInfer: every request of the stream through ModelInfer, concurrently (so that they
    batch), and exactly one response each, in the order they finish: the result, or the error's
    message with the request's id (Triton's form; tritonclient hands it to the callback), a missing
    API key included."""

    async def call(request_iterator, context: grpc.aio.ServicerContext):
        metadata = metadata_of(context)  # the API key is checked per request, by ModelInfer
        responses: asyncio.Queue = asyncio.Queue()

        async def one(request):
            record = RequestRecord(request_id(request.id or None), "grpc ModelStreamInfer",
                                   traceparent(metadata.get(TRACEPARENT)))
            response, _, message = await answer(state, "ModelStreamInfer", servicer.ModelInfer, request, metadata, record)
            if response is None:
                failed = pb.ModelInferResponse(model_name=request.model_name, model_version=request.model_version,
                                               id=request.id)
                await responses.put(pb.ModelStreamInferResponse(error_message=message, infer_response=failed))
            else:
                await responses.put(pb.ModelStreamInferResponse(infer_response=response))

        tasks: list[asyncio.Task] = []

        async def read():
            try:
                async for request in request_iterator:
                    tasks.append(asyncio.create_task(one(request)))
                await asyncio.gather(*tasks)
            finally:  # the end of the responses, however the requests ended
                responses.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (response := await responses.get()) is not None:
                yield response
        finally:  # the client went away: what it sent is not computed
            for task in (reader, *tasks):
                task.cancel()

    return grpc.stream_stream_rpc_method_handler(call, request_deserializer=pb.ModelInferRequest.FromString,
                                                 response_serializer=pb.ModelStreamInferResponse.SerializeToString)


def unsupported(extension: str):
    """The method of an RPC of a Triton extension this server does not offer: UNIMPLEMENTED, named."""

    async def method(request, metadata):
        raise Unsupported(inference.UNSUPPORTED[extension])

    return method


RPCS = {
    "ServerLive": (pb.ServerLiveRequest, pb.ServerLiveResponse),
    "ServerReady": (pb.ServerReadyRequest, pb.ServerReadyResponse),
    "ModelReady": (pb.ModelReadyRequest, pb.ModelReadyResponse),
    "ServerMetadata": (pb.ServerMetadataRequest, pb.ServerMetadataResponse),
    "ModelMetadata": (pb.ModelMetadataRequest, pb.ModelMetadataResponse),
    "ModelConfig": (pb.ModelConfigRequest, pb.ModelConfigResponse),
    "ModelInfer": (pb.ModelInferRequest, pb.ModelInferResponse),
    "RepositoryIndex": (pb.RepositoryIndexRequest, pb.RepositoryIndexResponse),
    "ModelStatistics": (pb.ModelStatisticsRequest, pb.ModelStatisticsResponse),
}
# The other RPCs of Triton's GRPCInferenceService, by the extension they belong to.
UNSUPPORTED_RPCS = {
    "RepositoryModelLoad": "model_repository",
    "RepositoryModelUnload": "model_repository", "TraceSetting": "trace", "LogSettings": "logging",
    **{f"{kind}SharedMemory{verb}": "shared_memory" for kind in ("System", "Cuda")
       for verb in ("Status", "Register", "Unregister")},
}


async def start(state: ServiceState) -> grpc.aio.Server:
    """The gRPC server on the settings' host and gRPC port, started on the running event loop."""
    settings = state.settings
    limit = settings.max_upload_bytes + GRPC_MESSAGE_OVERHEAD  # the payload plus the message's own fields
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit),
                                      ("grpc.max_send_message_length", limit),
                                      # other server processes of this host share the port (service/workers.py)
                                      ("grpc.so_reuseport", 1 if state.peers.count > 1 else 0)])
    servicer = Servicer(state)
    handlers = {name: handler(state, name, getattr(servicer, name), *types) for name, types in RPCS.items()}
    handlers |= {name: handler(state, name, unsupported(extension)) for name, extension in UNSUPPORTED_RPCS.items()}
    handlers["ModelStreamInfer"] = stream_handler(state, servicer)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    address = f"{settings.host}:{settings.grpc_port}"
    if server.add_insecure_port(address) == 0:
        raise OSError(f"cannot listen for gRPC on {address}")
    await server.start()
    log.info("gRPC (KServe v2) on %s", address)
    return server


async def stop(server: grpc.aio.Server, grace_s: float) -> None:
    """Refuse new calls, let the ones in flight finish for up to grace_s, then close."""
    started = time.perf_counter()
    await server.stop(grace_s)
    log.info("gRPC stopped after %.1f s", time.perf_counter() - started)
