"""The KServe v2 gRPC API (GRPCInferenceService), in the service's process and event loop.

Served on ACMIX_GRPC_PORT (default 8001, as Triton; 0: off) by grpc.aio, started and stopped by
the app's lifespan, so it shares the batcher, the backend and the settings with HTTP: the models
and their checks are service/inference.py's. tritonclient.grpc works unchanged: ServerLive,
ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelConfig, ModelInfer (inputs in
`raw_input_contents` or typed `contents`; outputs in `raw_output_contents`, as Triton sends them;
the classification extension), ModelStreamInfer, ModelStatistics and RepositoryIndex; Triton's
other RPCs answer UNIMPLEMENTED naming their extension. gRPC's standard health service answers
beside them (service/kserve_grpc/health.py).

The service's domain errors become gRPC status codes (service/errors.py); every call carries
`x-request-id` and `x-model-digest` in its trailing metadata, counts in the metrics by method
and code, and logs one line (service/request_log.py), a message that does not parse included
(INVALID_ARGUMENT). Messages up to the upload limit are taken; responses are not limited.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
import numpy as np
from google.protobuf import json_format
from google.protobuf.message import DecodeError

from model.spec import INPUT_NAME, INPUT_SHAPE, NUM_CLASSES, OUTPUT_NAME
from service import inference
from service.api.security import check_key
from service.errors import BadRequest, NotFound, ServiceError, Unavailable, Unsupported, status_message
from service.kserve_grpc.health import add_health
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
from service.settings import GRPC_MESSAGE_OVERHEAD, address
from service.state import ServiceState

# The server's own lines (started, stopped) under the service's logger; `log` is the request log's.
service_log = logging.getLogger("service")
SERVICE = "inference.GRPCInferenceService"  # the protocol's name: the gRPC method paths use it
IMAGE_ELEMENTS = int(np.prod(INPUT_SHAPE))
FINAL_RESPONSE_ASKED, FINAL_RESPONSE = "triton_enable_empty_final_response", "triton_final_response"
DRAIN_POLL_S = 0.2  # how soon a stream sees the drain begin


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
        statistics = await inference.statistics(self.state, request.name or None, request.version or None)
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
            input=[pb.ModelInput(name=t["name"], data_type=t["data_type"], dims=t["dims"],
                                 reshape=pb.ModelTensorReshape(**t["reshape"]) if "reshape" in t else None)
                   for t in config["input"]],
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
        inference.check_no_shared_memory(f"input {INPUT_NAME!r}", tensor.parameters, region_of(tensor.parameters))
        raw = list(request.raw_input_contents)
        if len(raw) > 1:
            raise BadRequest(f"raw_input_contents holds {len(raw)} tensors; the model takes one")
        deadline = state.deadline(timeout_parameter(request.parameters, metadata))
        outputs = requested_outputs(request)
        if raw and tensor.HasField("contents"):  # as Triton: one or the other, never one silently ignored
            raise BadRequest(f"contents field must not be specified when using raw_input_contents for "
                             f"{INPUT_NAME!r} for model {request.model_name!r}")
        if image:
            if raw:
                files = inference.unpack_bytes(raw[0], count)
            else:
                files = list(typed_contents(tensor, "bytes_contents"))
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
                batch = np.asarray(typed_contents(tensor, "fp32_contents"), dtype=np.float32)
                if batch.size != values:
                    raise BadRequest(f"input {INPUT_NAME!r} {list(tensor.shape)} needs {values} values, "
                                     f"fp32_contents has {batch.size}")
            logits = await inference.infer_tensor(state, batch.reshape(count, *INPUT_SHAPE), deadline)
        return infer_response(request, outputs, logits)


def typed_contents(tensor, field: str):
    """The values of `tensor`'s typed contents, which its datatype takes in `field` only; BadRequest
    naming the field sent instead."""
    other = [f.name for f, _ in tensor.contents.ListFields() if f.name != field]
    if other:
        raise BadRequest(f"input {INPUT_NAME!r} is {tensor.datatype}, which takes contents.{field} (or "
                         f"raw_input_contents), not contents.{other[0]}")
    return getattr(tensor.contents, field)


def require_key(state: ServiceState, metadata: dict[str, str]) -> None:
    """The HTTP API's check (service/api/security.py) on the metadata x-api-key and authorization."""
    check_key(state.settings.api_key, metadata.get("x-api-key"), metadata.get("authorization"))


def timeout_parameter(parameters, metadata) -> float | None:
    """The request's `timeout` parameter (microseconds, as Triton) in seconds, or None."""
    if "timeout" not in parameters:
        return None
    choice = parameters["timeout"].WhichOneof("parameter_choice")
    value = getattr(parameters["timeout"], choice) if choice else None
    if choice not in ("int64_param", "uint64_param") or value <= 0:
        sent = f"{choice} {value!r}" if choice else "a parameter without a value"
        raise BadRequest(f"the timeout parameter must be a positive integer of microseconds, got {sent}")
    return value / 1e6


def region_of(parameters):
    """The shared_memory_region parameter's value, whichever its type (a region sent as an integer is
    named as sent, not as ''), where one is given."""
    if "shared_memory_region" not in parameters:
        return None
    choice = parameters["shared_memory_region"].WhichOneof("parameter_choice")
    return getattr(parameters["shared_memory_region"], choice) if choice else None


def requested_outputs(request) -> list[int]:
    """The classification count of each requested output; BadRequest before any inference."""
    requested = list(request.outputs) or [pb.ModelInferRequest.InferRequestedOutputTensor(name=OUTPUT_NAME)]
    counts = []
    for spec in requested:
        if spec.name != OUTPUT_NAME:
            raise BadRequest(f"unknown output {spec.name!r}; the model gives {OUTPUT_NAME!r}")
        inference.check_no_shared_memory(f"output {OUTPUT_NAME!r}", spec.parameters, region_of(spec.parameters))
        k = 0
        if "classification" in spec.parameters:
            parameter = spec.parameters["classification"]
            choice = parameter.WhichOneof("parameter_choice")
            if choice not in ("int64_param", "uint64_param"):
                sent = f"{choice} {getattr(parameter, choice)!r}" if choice else "a parameter without a value"
                raise BadRequest(f"classification must be an integer (int64_param or uint64_param) in "
                                 f"0..{NUM_CLASSES}, got {sent}")
            k = getattr(parameter, choice)
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


def parse(request_type, data: bytes):
    """`data` as a `request_type` message, or BadRequest naming why not. Parsed here rather than by grpc
    (as its request_deserializer), whose failure would be UNKNOWN with a traceback, neither counted nor logged."""
    try:
        return request_type.FromString(data)
    except DecodeError as exc:
        raise BadRequest(f"malformed request message: {exc}") from None  # exc names the type


def parsing(request_type, method):
    """`method` of a message's bytes, parsed first."""

    async def parsed(data: bytes, metadata):
        return await method(parse(request_type, data), metadata)

    return parsed


def refuse(error: ServiceError):
    """A method that fails with `error`."""

    async def method(request, metadata):
        raise error

    return method


def handler(state: ServiceState, name: str, method, request_type=None, response_type=None):
    """A unary RPC over `method` (request and response as bytes where no type is given)."""
    if request_type is not None:
        method = parsing(request_type, method)

    async def call(request, context: grpc.aio.ServicerContext):
        metadata = metadata_of(context)
        record = RequestRecord(request_id(metadata.get(REQUEST_ID)), f"grpc {name}", traceparent(metadata.get(TRACEPARENT)))
        trailing = [(REQUEST_ID, record.request_id)]
        if state.model_digest:
            trailing.append((MODEL_DIGEST, state.model_digest[:12]))
        context.set_trailing_metadata(trailing)
        response, code, message = await answer(state, name, method, request, metadata, record)
        if response is None:  # the message names what the request sent, which may be of any length
            await context.abort(code, status_message(message))
        return response

    return grpc.unary_unary_rpc_method_handler(
        call, response_serializer=response_type.SerializeToString if response_type else None)


def stream_handler(state: ServiceState, servicer: Servicer):
    """ModelStreamInfer: every request of the stream through ModelInfer, concurrently (so that they
    batch), and exactly one response each, in the order the requests came (as Triton answers a model
    that is not decoupled: tritonclient hands an error to its callback without the request's id, so
    clients match by position): the result, or the error's message with the request's id (Triton's
    form), a missing API key included. A message that does not parse is answered in its place like
    any bad request, and the stream goes on: gRPC frames each message, so the ones after it are whole,
    and the requests in flight are answered."""

    async def call(request_iterator, context: grpc.aio.ServicerContext):
        metadata = metadata_of(context)  # the API key is checked per request, by ModelInfer
        answers: asyncio.Queue = asyncio.Queue()  # each request's task, in the order they came; None: no more
        pending: set[asyncio.Task] = set()

        async def one(data: bytes):
            try:
                request, method = parse(pb.ModelInferRequest, data), servicer.ModelInfer
            except BadRequest as error:  # answered, counted and logged as any bad request
                request, method = pb.ModelInferRequest(), refuse(error)  # no id or model to answer with
            record = RequestRecord(request_id(request.id or None), "grpc ModelStreamInfer",
                                   traceparent(metadata.get(TRACEPARENT)))
            response, _, message = await answer(state, "ModelStreamInfer", method, request, metadata, record)
            if response is None:
                failed = pb.ModelInferResponse(model_name=request.model_name, model_version=request.model_version,
                                               id=request.id)
                return pb.ModelStreamInferResponse(error_message=message, infer_response=marked_final(request, failed))
            return pb.ModelStreamInferResponse(infer_response=marked_final(request, response))

        async def read():
            try:
                async for data in request_iterator:
                    task = asyncio.create_task(one(data))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                    answers.put_nowait(task)
            finally:  # the end of the requests, however they ended
                answers.put_nowait(None)

        async def end_on_drain():  # an idle stream would hold the gRPC drain for its whole grace
            while not state.draining:
                await asyncio.sleep(DRAIN_POLL_S)
            reader.cancel()  # no request read after it; those read are answered, then the stream ends

        reader = asyncio.create_task(read())
        drain = asyncio.create_task(end_on_drain())
        try:
            while (task := await answers.get()) is not None:
                yield await task  # the requests after it compute meanwhile
        finally:  # the client went away: what it sent is not computed
            for task in (reader, drain, *pending):
                task.cancel()

    return grpc.stream_stream_rpc_method_handler(call, response_serializer=pb.ModelStreamInferResponse.SerializeToString)


def marked_final(request, response):
    """`response` with Triton's `triton_final_response` flag where the request asked for it
    (`triton_enable_empty_final_response`, tritonclient's enable_empty_final_response): a client that
    asks reads responses until one has the flag, and the one response to a request of a model that is
    not decoupled is its final one, as Triton marks it."""
    asked = request.parameters.get(FINAL_RESPONSE_ASKED)
    if asked is not None and asked.bool_param:
        response.parameters[FINAL_RESPONSE].bool_param = True
    return response


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
    # Responses are not limited (as Triton's): a request already accepted and computed must not fail in
    # the sending; classification strings can make a response several times its request.
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit),
                                      ("grpc.max_send_message_length", -1),
                                      # other server processes of this host share the port (service/workers.py)
                                      ("grpc.so_reuseport", 1 if state.peers.count > 1 else 0)])
    servicer = Servicer(state)
    handlers = {name: handler(state, name, getattr(servicer, name), *types) for name, types in RPCS.items()}
    handlers |= {name: handler(state, name, unsupported(extension)) for name, extension in UNSUPPORTED_RPCS.items()}
    handlers["ModelStreamInfer"] = stream_handler(state, servicer)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    add_health(server, state)  # grpc.health.v1 beside it (service/kserve_grpc/health.py)
    where = address(settings.host, settings.grpc_port)
    try:
        bound = server.add_insecure_port(where)
    except RuntimeError:  # grpcio 1.85 raises where earlier versions returned 0
        bound = 0
    if bound == 0:
        raise OSError(f"cannot listen for gRPC on {where} (another program holds the port, or the host is "
                      "not an address of this machine)")
    await server.start()
    service_log.info("gRPC (KServe v2) on %s", where)
    return server


async def stop(server: grpc.aio.Server, grace_s: float) -> None:
    """Refuse new calls, let the ones in flight finish for up to grace_s, then close."""
    started = time.perf_counter()
    await server.stop(grace_s)
    service_log.info("gRPC stopped after %.1f s", time.perf_counter() - started)
