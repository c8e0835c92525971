"""POST /predict and /predict/batch: uploaded images to CIFAR-10 labels."""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Header, Request, UploadFile
from pydantic import BaseModel, WithJsonSchema

from model.preprocessing import ImageError
from service.api.security import require_api_key
from service.errors import BadRequest, Overloaded, ServiceError, error_responses
from service.inference import check_batch_size
from service.predictions import classify
from service.state import ServiceState, StateDep

log = logging.getLogger(__name__)

router = APIRouter(tags=["predict"], dependencies=[Depends(require_api_key)])

TopK = Annotated[int, Form(ge=1, le=10, description="how many classes to return, best first")]
# The request's own deadline, as v2's `timeout` parameter is for /v2 (never later than the server's).
# At least a microsecond, as v2's: a positive value below it (5e-324) became 0 s in seconds, and a
# 400 "must be positive, got 0 s" (or, where the thread flushes subnormals, a 422 "greater than 0").
# Documented as the number a header can carry (FastAPI's `anyOf: [number, null]` invites "null").
TimeoutMs = Annotated[float | None, Header(alias="X-Request-Timeout-Ms", ge=0.001,
                                           description="answer within this many milliseconds (at least 0.001), "
                                                       "else 504"),
                      WithJsonSchema({"type": "number", "minimum": 0.001})]
# A `file` part: multipart parsing gives one without a filename (curl -F 'file=<a.png') as text,
# which predict_one refuses by name; declared UploadFile alone, FastAPI's 422 would echo it whole.
# Documented as the upload it must be.
FilePart = Annotated[UploadFile | str,
                     WithJsonSchema({"type": "string", "contentMediaType": "application/octet-stream"})]


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


async def predict_one(state: ServiceState, upload: UploadFile | str, top_k: int, deadline: float) -> Prediction:
    if isinstance(upload, str):
        raise BadRequest("the file part has no filename: send it as a file upload (curl -F file=@image.png)")
    data = await upload.read()
    try:
        image = await state.decode(data, deadline)
    except ImageError as exc:
        name = f" {upload.filename!r}" if upload.filename else ""
        raise BadRequest(f"file{name}: {exc}") from None
    logits = (await state.logits([image], deadline))[0]
    return Prediction(**classify(logits, top_k, state.temperature), model=state.settings.model_name,
                      backend=state.backend_name)


@router.post("/predict", response_model=Prediction, summary="Classify one image",
             responses=error_responses(400, 401, 408, 413, 429, 500, 503, 504))
async def predict(
    request: Request,
    state: StateDep,
    file: Annotated[FilePart, File(description="JPEG, PNG, WebP, BMP or GIF (first frame)")],
    top_k: TopK = 5,
    timeout_ms: TimeoutMs = None,
) -> Prediction:
    # `file` is the last of repeated parts; the others would go unanswered. (FastAPI has parsed the
    # form already: request.form() returns it.)
    if len((await request.form()).getlist("file")) > 1:
        raise BadRequest("several `file` parts: send one file to /predict, or several to /predict/batch")
    return await predict_one(state, file, top_k, state.deadline(timeout_ms / 1000 if timeout_ms else None))


# A file that fails gets its own status in `results`; the request as a whole fails only as these do.
@router.post("/predict/batch", response_model=BatchPrediction, summary="Classify several images, one result each",
             responses=error_responses(400, 401, 408, 413, 429))
async def predict_batch(
    state: StateDep,
    file: Annotated[list[FilePart], File(description="several `file` parts", min_length=1)],
    top_k: TopK = 5,
    timeout_ms: TimeoutMs = None,
) -> BatchPrediction:
    # More files than the queue holds could never all be answered: refused whole, as /v2 refuses such
    # a tensor, rather than answering the overflow with 429s of their own (Starlette refuses past 1,000 parts).
    check_batch_size(state, len(file))
    deadline = state.deadline(timeout_ms / 1000 if timeout_ms else None)

    async def one(upload: UploadFile | str) -> BatchItem:
        filename = None if isinstance(upload, str) else upload.filename
        try:
            prediction = await predict_one(state, upload, top_k, deadline)
        except ServiceError as exc:
            return BatchItem(filename=filename, error=exc.message, status=exc.status)
        except Exception as exc:  # a bug, not this file's fault: logged, and the other files still answered
            log.exception("predict/batch: file %r failed", filename)
            return BatchItem(filename=filename, error=f"internal error: {type(exc).__name__}", status=500)
        return BatchItem(filename=filename, prediction=prediction)

    results = await asyncio.gather(*(one(upload) for upload in file))
    if all(result.status == Overloaded.status for result in results):  # shed whole: the client should retry
        raise Overloaded(results[0].error, retry_after=state.batcher.retry_after())
    return BatchPrediction(results=list(results), model=state.settings.model_name, backend=state.backend_name)
