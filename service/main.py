"""The FastAPI app: a lifespan that loads, warms and checks the backend, the routers, the middleware,
and the one place where the service's domain errors become HTTP responses."""

from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import numpy as np
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from model.spec import INPUT_SHAPE
from runtime.artifacts import onnx_temperature, sha256_file
from runtime.backend import BackendError
from runtime.reference import NOISE, ReferenceError, check, read_reference, reference_path
from service.api import health, predict, v2
from service.api.security import KeyBeforeUploadMiddleware
from service.backends import create_backend
from service.batching import DynamicBatcher
from service.errors import ServiceError, http_error_body
from service.kserve_grpc import server as grpc_server
from service.limits import BodyTimeoutMiddleware, ClientGoneMiddleware, UploadLimitMiddleware
from service.metrics import Metrics, MetricsMiddleware
from service.request_log import RequestIdMiddleware
from service.settings import Settings
from service.state import ServiceState

log = logging.getLogger("service")


def http_drain_seconds(settings: Settings) -> float:
    """How long SIGTERM waits for the HTTP requests in flight (uvicorn's graceful shutdown): the
    longest one can still take, its body (ACMIX_BODY_TIMEOUT_S) then its answer
    (ACMIX_REQUEST_TIMEOUT_S). A fixed 30 s cut off requests accepted under a longer timeout."""
    return settings.body_timeout_s + settings.request_timeout_s


def drain_seconds(settings: Settings) -> float:
    """The whole stop after SIGTERM: ACMIX_SHUTDOWN_DELAY_S, then the drain of HTTP, then the gRPC
    calls in flight up to their deadline (+1 s)."""
    return settings.shutdown_delay_s + http_drain_seconds(settings) + settings.request_timeout_s + 1


def load(state: ServiceState, backend=None, reason: str = "") -> None:
    """Create (unless given), load and warm up the backend (one batch of every size class it will
    see), then check it against the reference logits recorded beside the ONNX (runtime/reference.py)."""
    settings = state.settings
    plan = None
    if backend is None:
        name, reason = settings.resolved_backend()
        plan = settings.plan(name)
        backend = create_backend(plan, settings.max_batch_size, settings.threads_per_batch(state.peers.count))
    backend.load()
    try:
        for size in sorted({1, settings.max_batch_size}):
            backend.infer(np.zeros((size, *INPUT_SHAPE), np.float32))
        if plan is not None:
            self_check(backend, plan)
            try:
                state.temperature = onnx_temperature(plan.onnx)
                state.model_digest = sha256_file(plan.served)
            except (ValueError, OSError) as exc:  # a bad temperature recorded, a file gone since: the file's fault
                raise BackendError(str(exc)) from None
    except Exception:
        backend.close()
        raise
    state.backend, state.backend_reason = backend, reason
    log.info("backend %s ready (%s): %s; softmax temperature %.4g", backend.name, reason, backend.description,
             state.temperature)


def self_check(backend, plan) -> None:
    """BackendError unless the backend reproduces the reference logits of its ONNX; a warning where
    the ONNX came without them (a file brought by a user)."""
    path = reference_path(plan.onnx)
    if not path.is_file():
        log.warning("%s is missing: readiness without the reference check", path)
        return
    try:
        reference = read_reference(path)
        result = check(backend, reference, plan.precision)
    except ReferenceError as exc:
        raise BackendError(f"{plan.served}: {exc}") from None
    log.info("reference check passed: %d %s, max |logit diff| %.2g (closest to its tolerance: image %d, "
             "%.3g for %s)", result["n"], reference.source or "images", result["max_abs_diff"], result["worst_image"],
             result["tolerance"], plan.precision)
    if reference.source == NOISE:
        log.warning("the reference images are generated noise: the ONNX was exported without the data set "
                    "(ACMIX_DATA_DIR, or ../shared/data beside the project), so the check at start does not "
                    "see real images")


def open_service(state: ServiceState, backend=None, reason: str = "given", batcher=None) -> None:
    """Load, warm and check the backend and start batching; the service is then ready.

    `batcher` replaces the DynamicBatcher (Ray Serve passes one over @serve.batch: ServeBatcher in
    service/ray_app.py); what the service uses of it: `async infer_many(images, deadline, tag)`,
    `retry_after()` and `async close()`.
    """
    settings = state.settings
    try:
        load(state, backend, reason)
    except BackendError as exc:
        state.startup_error = str(exc)
        log.error("the backend did not load: %s", exc)
        raise
    state.decode_pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode")
    if batcher is None:
        batcher = DynamicBatcher(
            state.backend,
            max_batch=settings.max_batch_size,
            max_delay_s=settings.max_queue_delay_ms / 1000,
            max_queue=settings.max_queue_size,
            observer=state,
            workers=settings.batches_per_process(state.peers.count),
        )
        batcher.start()
    state.batcher = batcher
    state.ready = True
    log.info("requests %s", "need the API key (ACMIX_API_KEY)" if settings.api_key else
             "are not authenticated (ACMIX_API_KEY unset)")


async def close_service(state: ServiceState) -> None:
    """Readiness false, finish what is queued, release the backend; each released even where a step
    before it fails (its exception goes on)."""
    state.ready = False
    state.draining = True
    try:
        await state.batcher.close()
    finally:
        try:
            state.backend.close()
        finally:
            state.decode_pool.shutdown(wait=True)
    log.info("drained and closed")


async def exit_when_hung(state: ServiceState, interval_s: float = 1.0, exit=os._exit) -> None:
    """One of several server processes whose backend hangs (ServiceState.stuck_s): nothing outside
    restarts it (the orchestrator sees the others live) and it cannot drain (its executor thread
    never returns), so it exits at once, and the supervisor (service/workers.py) starts another."""
    while True:
        await asyncio.sleep(interval_s)
        if state.stuck_s() is not None:
            log.error("%s; this worker exits so that the supervisor starts another", state.not_ready_reason())
            exit(1)


class HeadAsGetMiddleware:
    """HEAD wherever GET works (RFC 9110 requires it of a general-purpose server; load balancers'
    health checks use it): the app answers a HEAD as a GET, and the server, whose own scope still
    says HEAD, sends the status and headers without the body."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "HEAD":
            scope = {**scope, "method": "GET"}
        await self.app(scope, receive, send)


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
        try:
            grpc = await grpc_server.start(state) if settings.grpc_port else None
        except OSError as exc:  # the port taken since `python -m service` checked it, say
            state.startup_error = str(exc)
            log.error("%s", exc)
            await close_service(state)
            raise
        if not (state.draining or state.stopping):  # a SIGTERM during startup: never marked ready, not even once
            state.peers.mark_ready()
        watchdog = asyncio.create_task(exit_when_hung(state)) if state.peers.count > 1 else None
        yield
        if watchdog is not None:
            watchdog.cancel()
        state.draining = True
        state.peers.mark_not_ready()
        try:
            if grpc is not None:
                # New calls are refused since SIGTERM (draining); those in flight end by their deadline.
                await grpc_server.stop(grpc, settings.request_timeout_s + 1)
        finally:
            await close_service(state)

    app = FastAPI(
        title="AlexNet-ACmix CIFAR-10 service",
        version="0.1.0",
        summary="Upload an image, get its CIFAR-10 label. Dynamic batching over TensorRT or ONNX Runtime.",
        lifespan=lifespan,
        # Metrics are Prometheus (/metrics); FastAPI's OpenTelemetry hooks would cost an environment
        # lookup on every request for nothing.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.service = state
    app.include_router(predict.router)
    app.include_router(v2.router)
    app.include_router(health.router)

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError):
        return JSONResponse(http_error_body(request.url.path, exc.message), status_code=exc.status, headers=exc.headers())

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        # FastAPI's own 422 body, less each error's `input`: that echoed whatever was sent, a whole
        # upload included, back to the client.
        errors = [{key: value for key, value in error.items() if key != "input"} for error in exc.errors()]
        for error in errors:  # the usual mistakes with /predict: the image as the body, or a part of another name
            if error.get("type") == "missing" and tuple(error.get("loc", ())) == ("body", "file"):
                sent = request.headers.get("content-type", "none").split(";")[0]
                error["msg"] = (f"Field required: send the image as a multipart/form-data part named `file` "
                                f"(curl -F file=@image.png); this request's Content-Type: {sent}")
        return JSONResponse({"detail": jsonable_encoder(errors)}, status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        if request.url.path.startswith("/v2"):
            return JSONResponse(http_error_body(request.url.path, str(exc.detail)), status_code=exc.status_code, headers=exc.headers)
        return await http_exception_handler(request, exc)

    app.add_middleware(KeyBeforeUploadMiddleware, state=state)  # innermost: counted and logged, before any read
    app.add_middleware(ClientGoneMiddleware)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    app.add_middleware(HeadAsGetMiddleware)  # outside the metrics: a HEAD counts as its route's GET
    app.add_middleware(UploadLimitMiddleware, max_bytes=settings.max_upload_bytes)
    app.add_middleware(BodyTimeoutMiddleware, seconds=settings.body_timeout_s)
    app.add_middleware(RequestIdMiddleware, state=state)
    if settings.cors_origins.strip():
        app.add_middleware(
            CORSMiddleware,
            allow_origins=[origin.strip() for origin in settings.cors_origins.split(",") if origin.strip()],
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Content-Type", "X-API-Key", "Authorization", "X-Request-ID", "X-Request-Timeout-Ms",
                           "Inference-Header-Content-Length", "traceparent"],
            expose_headers=["X-Request-ID", "X-Model-Digest", "Retry-After", "Inference-Header-Content-Length"],
        )
    return app
