"""Ray Serve deployment of the same service: same backends, preprocessing and HTTP API.

    serve run service.ray_app:build_app            # local Ray, settings from ACMIX_* variables
    serve run service/ray_serve.yaml               # a cluster (see the file for replicas, GPUs)

Each replica runs the FastAPI app of service/main.py through @serve.ingress with its own backend;
batching is Ray's @serve.batch (max batch size and wait from the same settings) instead of the
DynamicBatcher. `build_app` (Ray's application builder, called by `serve run`, not at import)
provisions the artifacts once (export/provision.py), then sizes the deployment from the settings
and passes the backend it chose to every replica, which runs that one (not its own node's "auto":
a GPU-less head must not decide for GPU workers) and provisions it on its node (a lock per node):
ACMIX_RAY_REPLICAS (a number, or "auto" for autoscaling between 1 and ACMIX_RAY_MAX_REPLICAS);
on the TensorRT backend one GPU per replica, each replica with its own execution context.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
from ray import serve

from service.batching import InBackend
from service.main import close_service, create_app, open_service
from service.settings import Settings

settings = Settings()
_replica_app = None


def replica_app():
    """This replica's FastAPI app, built once in the replica process (Ray calls it, so does __init__)."""
    global _replica_app
    if _replica_app is None:
        _replica_app = create_app(settings, manage_lifespan=False)
        _replica_app.middleware("http")(served_by)
    return _replica_app


class ServeBatcher:
    """The service's batcher interface over a @serve.batch method of the replica."""

    def __init__(self, batch_method):
        self.batch_method = batch_method
        self.in_backend = InBackend()  # the replica's batches, which infer_batch records

    def retry_after(self) -> float:
        return 1.0  # Ray answers overload itself (max_ongoing_requests)

    async def infer_many(self, images: list[np.ndarray], deadline: float, tag: str | None = None) -> list[np.ndarray]:
        remaining = max(deadline - time.perf_counter(), 0)
        async with asyncio.timeout(remaining):
            return await asyncio.gather(*(self.batch_method(image) for image in images))

    async def close(self) -> None:
        """Ray drains a replica's requests before it stops it."""


async def served_by(request, call_next):
    """Names the replica that answered (header x-served-by), to see the load spread."""
    response = await call_next(request)
    response.headers["x-served-by"] = serve.get_replica_context().replica_id.unique_id
    return response


def deployment_options(settings: Settings, backend: str) -> dict:
    options: dict = {
        "ray_actor_options": {"num_gpus": 1} if backend == "tensorrt" else {"num_cpus": settings.ray_cpus_per_replica},
        "max_ongoing_requests": settings.max_queue_size,
    }
    if settings.ray_replicas == "auto":
        options["autoscaling_config"] = {
            "min_replicas": 1,
            "max_replicas": settings.ray_max_replicas,
            "target_ongoing_requests": 2 * settings.max_batch_size,
        }
    else:
        options["num_replicas"] = int(settings.ray_replicas)
    return options


@serve.deployment
@serve.ingress(replica_app)
class Classifier:
    def __init__(self, backend: str):
        # The backend build_app sized the deployment for (a GPU each, or CPUs), not this node's own
        # "auto", and its artifacts made on this node too (under its lock: once per node).
        from export.provision import provision

        self.state = replica_app().state.service
        self.state.settings = self.state.settings.model_copy(update={"backend": backend})
        provision(self.state.settings.plan(backend), progress=False)
        self.batcher = ServeBatcher(self.infer_batch)
        open_service(self.state, batcher=self.batcher)
        self.infer_batch.set_max_batch_size(settings.max_batch_size)
        self.infer_batch.set_batch_wait_timeout_s(settings.max_queue_delay_ms / 1000)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def infer_batch(self, images: list[np.ndarray]) -> list[np.ndarray]:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            with self.batcher.in_backend.batch(started):  # left before a failure is counted (a failure is not a hang)
                logits = await loop.run_in_executor(None, self.state.backend.infer, np.stack(images))
        except Exception as exc:  # counted as the service's batcher counts it: readiness, liveness, metrics
            self.state.batch_failed(len(images), exc)
            raise
        self.state.batch_done(len(images), time.perf_counter() - started, [])
        return list(logits)

    def check_health(self) -> None:
        """Ray Serve's health check of the replica (every few seconds): failing as /healthz does, so
        that Ray replaces a replica whose batches fail in a row or whose backend hangs."""
        if self.state.failing:
            raise RuntimeError(self.state.not_ready_reason())

    async def __del__(self):
        await close_service(self.state)


def build_app(args: dict | None = None):
    """Ray Serve's application builder: provision the artifacts once, then the deployment, bound."""
    from export.provision import provision

    backend, _ = settings.resolved_backend()
    provision(settings.plan(backend), progress=False)
    return Classifier.options(**deployment_options(settings, backend)).bind(backend)
