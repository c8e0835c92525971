"""Liveness, readiness, metrics, labels, and the upload page."""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel

from model.spec import CLASSES
from service.inference import VERSION, model_names
from service.state import StateDep

router = APIRouter(tags=["health"])
PAGE = Path(__file__).resolve().parent.parent / "static" / "index.html"


class Liveness(BaseModel):
    status: str
    error: str | None = None


class Readiness(BaseModel):
    ready: bool
    model: str
    backend: str
    precision: str
    backend_reason: str
    backend_detail: str
    model_digest: str
    max_batch_size: int
    error: str | None = None


@router.get("/healthz", summary="Live: the process answers, its batches have not failed "
                                "ACMIX_MAX_CONSECUTIVE_FAILURES times in a row, and none hangs in the backend",
            responses={200: {"model": Liveness}, 503: {"model": Liveness, "description": "Failing"}})
async def healthz(state: StateDep):
    if state.failing:
        return JSONResponse({"status": "failing", "error": state.not_ready_reason()}, status_code=503)
    return {"status": "ok"}


@router.get("/readyz", response_model=Readiness,
            summary="Ready: backend loaded, warmed up and checked against the reference logits; not draining "
                    "or failing", responses={503: {"model": Readiness, "description": "Not ready"}})
async def readyz(state: StateDep):
    body = Readiness(
        ready=state.is_ready(),
        model=state.settings.model_name,
        backend=state.backend_name,
        precision=state.settings.precision,
        backend_reason=state.backend_reason,
        backend_detail=state.backend.description if state.backend else "",
        model_digest=state.model_digest,
        max_batch_size=state.settings.max_batch_size,
        error=None if state.is_ready() else state.not_ready_reason(),
    )
    return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
async def metrics(state: StateDep) -> Response:
    """The service's metrics, then Triton's per-model ones (nv_inference_*, service/statistics.py). Read in
    a thread: with several server processes they are summed from every process's files."""
    def read() -> Response:
        return state.metrics.response(state.statistics.as_triton_metrics(list(model_names(state)), VERSION))

    return await asyncio.to_thread(read)


@router.get("/labels", summary="The class labels, by class_id")
async def labels() -> dict:
    return {"labels": list(CLASSES)}


@router.get("/", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(PAGE, media_type="text/html")
