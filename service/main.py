"""The FastAPI app: a lifespan that loads and warms the backend, the routers, the middleware."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from starlette.exceptions import HTTPException

from model.spec import INPUT_SHAPE
from service.api import health, predict, v2
from service.backends import create_backend
from service.backends.base import BackendError
from service.batching import DynamicBatcher
from service.metrics import Metrics, MetricsMiddleware
from service.settings import Settings
from service.state import ServiceState

log = logging.getLogger("service")


def load(state: ServiceState, backend=None, reason: str = "") -> None:
    """Create (unless given), load and warm up the backend: one batch of every size class it will see."""
    if backend is None:
        backend, reason = create_backend(state.settings)
    backend.load()
    for size in sorted({1, state.settings.max_batch_size}):
        backend.infer(np.zeros((size, *INPUT_SHAPE), np.float32))
    state.backend, state.backend_reason = backend, reason
    log.info("backend %s ready (%s): %s", backend.name, reason, backend.description)


def open_service(state: ServiceState, backend=None, reason: str = "given", batcher=None) -> None:
    """Load and warm the backend and start batching; the service is then ready.

    `batcher` replaces the DynamicBatcher (Ray Serve passes one over @serve.batch); anything with
    `async infer(image, deadline) -> logits` and `async close()`.
    """
    settings = state.settings
    state.decode_pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode")
    try:
        load(state, backend, reason)
    except BackendError as exc:
        state.load_error = str(exc)
        log.error("the backend did not load: %s", exc)
        raise
    if batcher is None:
        batcher = DynamicBatcher(
            state.backend,
            max_batch=settings.max_batch_size,
            max_delay_s=settings.max_queue_delay_ms / 1000,
            max_queue=settings.max_queue_size,
            observer=state.metrics,
            workers=settings.inference_workers,
        )
        batcher.start()
    state.batcher = batcher
    state.ready = True


async def close_service(state: ServiceState) -> None:
    """Readiness false, finish what is queued, release the backend."""
    state.ready = False
    state.draining = True
    await state.batcher.close()
    state.backend.close()
    state.decode_pool.shutdown(wait=True)
    log.info("drained and closed")


def create_app(
    settings: Settings | None = None, backend=None, backend_reason: str = "given", manage_lifespan: bool = True
) -> FastAPI:
    """The service app. `backend` (optional, not yet loaded) replaces the one the settings choose.

    manage_lifespan=False leaves open_service/close_service to the caller (Ray Serve replicas).
    """
    settings = settings or Settings()
    state = ServiceState(settings=settings, metrics=Metrics())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not manage_lifespan:
            yield
            return
        open_service(state, backend, backend_reason)
        yield
        await close_service(state)

    app = FastAPI(
        title="AlexNet-ACmix CIFAR-10 service",
        version="0.1.0",
        summary="Upload an image, get its CIFAR-10 label. Dynamic batching over TensorRT or ONNX Runtime.",
        lifespan=lifespan,
        max_body_size=settings.max_upload_bytes,  # 413 before reading more, with or without Content-Length
        # Metrics are Prometheus (/metrics); FastAPI's OpenTelemetry hooks would cost an environment
        # lookup on every request for nothing.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.service = state
    app.include_router(predict.router)
    app.include_router(v2.router)
    app.include_router(health.router)
    app.add_exception_handler(v2.V2Error, v2.v2_error_response)

    @app.exception_handler(HTTPException)
    async def name_the_upload_limit(request: Request, exc: HTTPException):
        if exc.status_code == 413:
            exc = HTTPException(413, f"request body over the upload limit of {settings.max_upload_bytes} bytes")
        return await http_exception_handler(request, exc)

    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    return app
