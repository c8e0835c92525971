"""The service's domain errors: raised where a request fails, mapped to a protocol only at its edge.

Each names the HTTP status and the gRPC status code it becomes; service/main.py maps them to HTTP
responses (one handler, with the body `http_error_body` gives), the gRPC server to status codes.
Nothing below the edge raises an HTTPException.
"""

from __future__ import annotations

import json

from pydantic import BaseModel


class ErrorDetail(BaseModel):
    """An error outside /v2, as FastAPI's own (a 422's `detail` is its list of validation errors instead)."""

    detail: str


class ErrorV2(BaseModel):
    """An error under /v2, as KServe v2 and tritonclient read it."""

    error: str


# What each error status means, for the API docs.
ERROR_STATUSES = {
    400: "Bad request: the image, tensor, JSON or a parameter is wrong; the message names the cause",
    401: "Missing or wrong API key (ACMIX_API_KEY is set)",
    404: "Unknown model or version",
    408: "The request body was not received within ACMIX_BODY_TIMEOUT_S",
    413: "The request body is over the upload limit (ACMIX_MAX_UPLOAD_BYTES)",
    429: "The queue is full; retry after Retry-After seconds",
    500: "The backend failed on the batch (the server's fault, not the request's)",
    503: "Not ready, or draining",
    504: "No result before the request's deadline",
}


def error_responses(*statuses: int, v2: bool = False) -> dict:
    """FastAPI's `responses` documenting these error statuses with the body they carry."""
    model = ErrorV2 if v2 else ErrorDetail
    return {status: {"model": model, "description": ERROR_STATUSES[status]} for status in statuses}


def http_error_body(path: str, message: str) -> dict:
    """An HTTP error's JSON body: KServe v2's ({"error": ...}) under /v2, FastAPI's ({"detail": ...}) elsewhere."""
    return {"error": message} if path.startswith("/v2") else {"detail": message}


async def send_http_error(send, path: str, status: int, message: str, headers: dict[str, str]) -> None:
    """An HTTP error answered from ASGI middleware, outside the app's handlers: the same JSON body."""
    body = json.dumps(http_error_body(path, message)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            *((name.lower().encode(), value.encode()) for name, value in headers.items())]})
    await send({"type": "http.response.body", "body": body})


# gRPC sends a status's message in the trailers, percent-encoded (each byte outside printable ASCII, and
# '%', as three), where clients refuse metadata over 8 KiB (with a chance; all over 16 KiB) with their
# own RESOURCE_EXHAUSTED about metadata: a message naming a megabyte model name lost its cause.
STATUS_MESSAGE_BYTES = 4096


def status_message(message: str, limit: int = STATUS_MESSAGE_BYTES) -> str:
    """`message` as a gRPC status message of at most `limit` bytes on the wire: a longer one keeps its
    beginning and its end (the cause and what to do), and says how many characters are left out."""

    def within(text: str, budget: int) -> str:
        for end, char in enumerate(text):
            budget -= sum(1 if 0x20 <= b <= 0x7E and b != 0x25 else 3 for b in char.encode())
            if budget < 0:
                return text[:end]
        return text

    if len(within(message, limit)) == len(message):
        return message
    side = (limit - 64) // 2  # the marker's room
    head, tail = within(message, side), within(message[::-1], side)[::-1]
    return f"{head} ... [{len(message) - len(head) - len(tail)} characters left out] ... {tail}"


class ServiceError(Exception):
    status = 500
    grpc_code = "INTERNAL"
    fixed_headers: dict[str, str] = {}

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        retry = {"Retry-After": str(max(1, round(self.retry_after)))} if self.retry_after is not None else {}
        return {**self.fixed_headers, **retry}


class BadRequest(ServiceError):
    """The request itself is wrong: a bad image, tensor, JSON body or parameter."""

    status, grpc_code = 400, "INVALID_ARGUMENT"


class Unauthenticated(ServiceError):
    status, grpc_code = 401, "UNAUTHENTICATED"
    fixed_headers = {"WWW-Authenticate": "Bearer"}


class NotFound(ServiceError):
    """An unknown model or version."""

    status, grpc_code = 404, "NOT_FOUND"


class TooLarge(ServiceError):
    status, grpc_code = 413, "RESOURCE_EXHAUSTED"


class Overloaded(ServiceError):
    """The queue is full; retry later. On gRPC UNAVAILABLE, as Triton answers a full queue: the code
    gRPC's retry policies and tritonclient users retry on (RESOURCE_EXHAUSTED reads as a quota)."""

    status, grpc_code = 429, "UNAVAILABLE"


class Unavailable(ServiceError):
    """Not ready yet, or draining."""

    status, grpc_code = 503, "UNAVAILABLE"


class Unsupported(ServiceError):
    """A part of the protocol (a Triton extension) this server does not offer; the message says which."""

    status, grpc_code = 501, "UNIMPLEMENTED"


class DeadlineExceeded(ServiceError):
    status, grpc_code = 504, "DEADLINE_EXCEEDED"


class InferenceFailed(ServiceError):
    """The backend failed on a batch (the server's fault, not the request's)."""

    status, grpc_code = 500, "INTERNAL"
