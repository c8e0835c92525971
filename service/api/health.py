"""Liveness, readiness, metrics, labels, and the upload page."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel

from model.spec import CLASSES
from service.state import StateDep

router = APIRouter(tags=["health"])
PAGE = Path(__file__).resolve().parent.parent / "static" / "index.html"


class Readiness(BaseModel):
    ready: bool
    model: str
    backend: str
    backend_reason: str
    backend_detail: str
    max_batch_size: int
    error: str | None = None


@router.get("/healthz", summary="Live: the process answers")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", response_model=Readiness, summary="Ready: backend loaded and warmed up, not draining",
            responses={503: {"model": Readiness}})
async def readyz(state: StateDep):
    body = Readiness(
        ready=state.ready and not state.draining,
        model=state.settings.model_name,
        backend=state.backend_name,
        backend_reason=state.backend_reason,
        backend_detail=state.backend.description if state.backend else "",
        max_batch_size=state.settings.max_batch_size,
        error=state.load_error or ("draining" if state.draining else None),
    )
    return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(state: StateDep) -> Response:
    return state.metrics.response()


@router.get("/labels", summary="The class labels, by class_id")
async def labels() -> dict:
    return {"labels": list(CLASSES)}


@router.get("/", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(PAGE, media_type="text/html")
