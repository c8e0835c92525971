"""gRPC's standard health service (grpc.health.v1.Health, grpcio-health-checking) on the gRPC port,
beside KServe v2: what Kubernetes' gRPC probes, grpc_health_probe and gRPC load balancers call.

Its status is the service's readiness (GET /readyz: ServiceState.is_ready): SERVING once the backend
is loaded, warmed up and checked, and while it is neither draining nor failing; NOT_SERVING
otherwise. It answers for the whole server ("") and for each model by name; another name is
NOT_FOUND (Check) or SERVICE_UNKNOWN (Watch), as the protocol says. Check reads readiness at the
call; Watch streams each change, seen within WATCH_INTERVAL_S. Like /readyz it needs no API key.
"""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio

from service.state import ServiceState

WATCH_INTERVAL_S = 0.5
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


class ReadinessHealth(aio.HealthServicer):
    def __init__(self, state: ServiceState):
        super().__init__()
        self.state = state
        self.names = ("", *state.settings.model_names())
        self._server_status = {name: self.status() for name in self.names}

    def status(self):
        return SERVING if self.state.is_ready() else NOT_SERVING

    async def Check(self, request, context):  # noqa: N802 (the protocol's method name)
        if request.service not in self.names:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}; this server "
                                                           f"answers for {', '.join(map(repr, self.names))}")
        return health_pb2.HealthCheckResponse(status=self.status())

    async def follow(self) -> None:
        """Keep what Watch streams current until the service drains (then NOT_SERVING for good)."""
        while not self.state.draining:
            status = self.status()
            for name in self.names:
                if self._server_status.get(name) != status:
                    await self.set(name, status)
            await asyncio.sleep(WATCH_INTERVAL_S)
        await self.enter_graceful_shutdown()


def add_health(server: grpc.aio.Server, state: ServiceState) -> asyncio.Task:
    """The health service on `server`; returns the task that keeps its Watch current (it ends when
    the service drains)."""
    health = ReadinessHealth(state)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    return asyncio.get_running_loop().create_task(health.follow(), name="grpc-health")
