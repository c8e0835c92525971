"""Prometheus metrics of one app instance (own registry, so several apps can live in one process).

With several server processes (service/workers.py), prometheus_client's multiprocess mode
(PROMETHEUS_MULTIPROC_DIR, set by the supervisor) counts every process: /metrics of any of them
reads all their values; the queue length is summed over the live processes. The registry also
holds Triton's statistics (service/statistics.py, the model_* metrics), read back the same way.
"""

from __future__ import annotations

import os
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.responses import Response
from starlette.routing import Match

from service.batching import BatchObserver

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 128, 256)


class Metrics(BatchObserver):
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("http_requests", "HTTP requests by route and status", ["route", "method", "status"],
                                registry=self.registry)
        self.latency = Histogram("http_request_duration_seconds", "Request latency by route", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue_wait = Histogram("batch_queue_wait_seconds", "Time an image waited in the queue",
                                    buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("batch_size", "Images per backend call", buckets=BATCH_BUCKETS,
                                    registry=self.registry)
        self.inference = Histogram("inference_duration_seconds", "Backend time per batch",
                                   buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue = Gauge("batch_queue_length", "Images waiting for a batch (summed over the server processes)",
                           registry=self.registry, multiprocess_mode="livesum")
        self.images = Counter("images_classified", "Images run through the backend", registry=self.registry)
        self.failed_batches = Counter("batches_failed", "Backend calls that failed", registry=self.registry)
        self.grpc_requests = Counter("grpc_requests", "gRPC requests by method and status code", ["method", "code"],
                                     registry=self.registry)

    def queue_length(self, length: int) -> None:
        self.queue.set(length)

    def batch_done(self, size: int, seconds: float, queue_waits: list[float]) -> None:
        self.batch_size.observe(size)
        self.inference.observe(seconds)
        self.images.inc(size)
        for wait in queue_waits:
            self.queue_wait.observe(wait)

    def batch_failed(self, size: int, error: Exception) -> None:
        self.failed_batches.inc()

    def response(self, more: str = "") -> Response:
        """Every metric of the registry (all the server's processes'), then `more` in the same text format."""
        registry = self.registry
        if shared_folder():
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        return Response(generate_latest(registry) + more.encode(), media_type=CONTENT_TYPE_LATEST)


def shared_folder() -> str | None:
    """The folder where prometheus_client's multiprocess mode keeps every server process's values
    (PROMETHEUS_MULTIPROC_DIR, set by the supervisor), or None: this process's registry holds them."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def route_template(scope) -> str:
    """The matched route's path template (/v2/models/{model}/infer), not the raw path."""
    route = scope.get("route")  # set by the router once it matched
    if route is not None:
        return getattr(route, "path", scope["path"])
    for candidate in scope["app"].router.routes:
        if candidate.matches(scope)[0] == Match.FULL:
            return getattr(candidate, "path", scope["path"])
    return "unmatched"


class MetricsMiddleware:
    """Requests by route and status, and latency by route; pure ASGI (cheaper than BaseHTTPMiddleware)."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500

        async def send_with_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            route = route_template(scope)
            self.metrics.requests.labels(route, scope["method"], str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)
