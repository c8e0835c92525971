"""The service's domain errors: raised where a request fails, mapped to a protocol only at its edge.

Each names the HTTP status and the gRPC status code it becomes; service/main.py maps them to HTTP
responses (one handler, with the body `http_error_body` gives), the gRPC server to status codes.
Nothing below the edge raises an HTTPException.
"""

from __future__ import annotations

import json


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
