"""gRPC's standard health service (grpc.health.v1.Health, grpcio-health-checking) on the gRPC port,
beside KServe v2: what Kubernetes' gRPC probes, grpc_health_probe and gRPC load balancers call.

Its status is the service's readiness (GET /readyz: ServiceState.is_ready): SERVING once the backend
is loaded, warmed up and checked, and while it is neither draining nor failing; NOT_SERVING
otherwise. It answers for the whole server ("") and for each model by name; another name is
NOT_FOUND (Check) or SERVICE_UNKNOWN (Watch), as the protocol says. Check reads readiness at the
call; Watch sends each change, seen within WATCH_INTERVAL_S, and ends once the service drains
(after NOT_SERVING), so that an open Watch (a load balancer's) never holds the gRPC drain. Like
/readyz it needs no API key.
"""

from __future__ import annotations

import asyncio

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.errors import status_message
from service.state import ServiceState

WATCH_INTERVAL_S = 0.5
Status = health_pb2.HealthCheckResponse


class ReadinessHealth(health_pb2_grpc.HealthServicer):
    def __init__(self, state: ServiceState):
        self.state = state
        self.names = ("", *state.settings.model_names())

    def status(self, service: str):
        if service not in self.names:
            return Status.SERVICE_UNKNOWN
        return Status.SERVING if self.state.is_ready() else Status.NOT_SERVING

    async def Check(self, request, context):  # noqa: N802 (the protocol's method names)
        status = self.status(request.service)
        if status == Status.SERVICE_UNKNOWN:
            await context.abort(grpc.StatusCode.NOT_FOUND, status_message(
                f"unknown service {request.service!r}; this server answers for {', '.join(map(repr, self.names))}"))
        return Status(status=status)

    async def Watch(self, request, context):  # noqa: N802
        sent = None
        while True:
            status = self.status(request.service)
            if status != sent:
                await context.write(Status(status=status))
                sent = status
            if self.state.draining and status != Status.SERVING:
                return
            await asyncio.sleep(WATCH_INTERVAL_S)


def parsing(method):
    """`method` of a request's bytes, parsed here: grpc's own deserializer, failing, answered UNKNOWN
    and logged a traceback; a message that does not parse is INVALID_ARGUMENT, as on the KServe service."""

    async def parsed(data: bytes, context: grpc.aio.ServicerContext):
        try:
            request = health_pb2.HealthCheckRequest.FromString(data)
        except DecodeError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request message: {exc}")
        return await method(request, context)

    return parsed


def add_health(server: grpc.aio.Server, state: ServiceState) -> None:
    servicer = ReadinessHealth(state)
    serialize = Status.SerializeToString
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("grpc.health.v1.Health", {
        "Check": grpc.unary_unary_rpc_method_handler(parsing(servicer.Check), response_serializer=serialize),
        "Watch": grpc.unary_stream_rpc_method_handler(parsing(servicer.Watch), response_serializer=serialize),
    }),))
