"""POST /predict and /predict/batch: uploaded images to CIFAR-10 labels."""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Header, UploadFile
from pydantic import BaseModel

from model.preprocessing import ImageError
from service.api.security import require_api_key
from service.errors import BadRequest, ServiceError
from service.predictions import classify
from service.state import ServiceState, StateDep

log = logging.getLogger(__name__)

router = APIRouter(tags=["predict"], dependencies=[Depends(require_api_key)])

TopK = Annotated[int, Form(ge=1, le=10, description="how many classes to return, best first")]
# The request's own deadline, as v2's `timeout` parameter is for /v2 (never later than the server's).
TimeoutMs = Annotated[float | None, Header(alias="X-Request-Timeout-Ms", gt=0,
                                           description="answer within this many milliseconds, else 504")]


class ClassProbability(BaseModel):
    label: str
    class_id: int
    probability: float


class Prediction(BaseModel):
    label: str
    class_id: int
    confidence: float
    top_k: list[ClassProbability]
    model: str
    backend: str


class BatchItem(BaseModel):
    filename: str | None
    prediction: Prediction | None = None
    error: str | None = None
    status: int = 200


class BatchPrediction(BaseModel):
    results: list[BatchItem]
    model: str
    backend: str


async def predict_one(state: ServiceState, upload: UploadFile, top_k: int, deadline: float) -> Prediction:
    data = await upload.read()
    try:
        image = await state.decode(data, deadline)
    except ImageError as exc:
        name = f" {upload.filename!r}" if upload.filename else ""
        raise BadRequest(f"file{name}: {exc}") from None
    logits = (await state.logits([image], deadline))[0]
    return Prediction(**classify(logits, top_k, state.temperature), model=state.settings.model_name,
                      backend=state.backend_name)


@router.post("/predict", response_model=Prediction, summary="Classify one image")
async def predict(
    state: StateDep,
    file: Annotated[UploadFile, File(description="JPEG, PNG, WebP, BMP or GIF (first frame)")],
    top_k: TopK = 5,
    timeout_ms: TimeoutMs = None,
) -> Prediction:
    return await predict_one(state, file, top_k, state.deadline(timeout_ms / 1000 if timeout_ms else None))


@router.post("/predict/batch", response_model=BatchPrediction, summary="Classify several images, one result each")
async def predict_batch(
    state: StateDep,
    file: Annotated[list[UploadFile], File(description="several `file` parts")],
    top_k: TopK = 5,
    timeout_ms: TimeoutMs = None,
) -> BatchPrediction:
    deadline = state.deadline(timeout_ms / 1000 if timeout_ms else None)

    async def one(upload: UploadFile) -> BatchItem:
        try:
            prediction = await predict_one(state, upload, top_k, deadline)
        except ServiceError as exc:
            return BatchItem(filename=upload.filename, error=exc.message, status=exc.status)
        except Exception as exc:  # a bug, not this file's fault: logged, and the other files still answered
            log.exception("predict/batch: file %r failed", upload.filename)
            return BatchItem(filename=upload.filename, error=f"internal error: {type(exc).__name__}", status=500)
        return BatchItem(filename=upload.filename, prediction=prediction)

    results = await asyncio.gather(*(one(upload) for upload in file))
    return BatchPrediction(results=list(results), model=state.settings.model_name, backend=state.backend_name)
