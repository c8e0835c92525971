"""Request identity and the one log line per request, for HTTP and gRPC alike.

Every request gets an id: the client's `X-Request-ID` (HTTP header or gRPC metadata) where it is a
plain token of at most 128 characters, else a new one. It is echoed on every HTTP response (and
in gRPC trailing metadata), with `X-Model-Digest`, the short sha256 of the served artifact. The
batcher adds the request's queue wait and inference time to its record (a context variable, so
that every image of a request adds to the same record), and one line is logged when it ends:

    request id=3f2a... route=POST /predict status=200 queue_ms=4.1 infer_ms=38.2 total_ms=45.0 traceparent=00-...

A W3C `traceparent` header (or gRPC metadata) is carried into that line as it came.
"""

from __future__ import annotations

import contextvars
import logging
import re
import time
import uuid
from dataclasses import dataclass, field

log = logging.getLogger("service.requests")
REQUEST_ID = "x-request-id"
MODEL_DIGEST = "x-model-digest"
TRACEPARENT = "traceparent"
_TOKEN = re.compile(r"^[A-Za-z0-9._:/+=@-]{1,128}$")
_UNPRINTABLE = re.compile(rb"[^\x21-\x7e]")
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")


@dataclass
class RequestRecord:
    request_id: str
    route: str
    traceparent: str | None = None
    started: float = field(default_factory=time.perf_counter)
    queue_s: float = 0.0  # the longest any of its images waited for a batch
    infer_s: float = 0.0  # the longest batch any of its images was in

    def add_batch(self, queue_s: float, infer_s: float) -> None:
        self.queue_s = max(self.queue_s, queue_s)
        self.infer_s = max(self.infer_s, infer_s)

    def line(self, status) -> str:
        parts = [f"id={self.request_id}", f"route={self.route}", f"status={status}",
                 f"queue_ms={self.queue_s * 1000:.1f}", f"infer_ms={self.infer_s * 1000:.1f}",
                 f"total_ms={(time.perf_counter() - self.started) * 1000:.1f}"]
        if self.traceparent:
            parts.append(f"traceparent={self.traceparent}")
        return "request " + " ".join(parts)


current: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar("request_record", default=None)


def request_id(given: str | None) -> str:
    """The client's id where it is a plain token, else a new one."""
    return given if given and _TOKEN.match(given) else uuid.uuid4().hex


def traceparent(given: str | None) -> str | None:
    return given if given and _TRACEPARENT.match(given.strip().lower()) else None


def logged_path(scope) -> str:
    """The request's path as it was sent (percent-encoded), with any byte that is not a printable
    ASCII character escaped as %XX: decoded, a %0A in it would start a forged log line."""
    sent = scope.get("raw_path") or scope["path"].encode()
    return _UNPRINTABLE.sub(lambda m: b"%%%02X" % m.group()[0], sent).decode("ascii")


def record_batch(queue_s: float, infer_s: float) -> None:
    """Called by the batcher for each image, in its request's context."""
    record = current.get()
    if record is not None:
        record.add_batch(queue_s, infer_s)


class RequestIdMiddleware:
    """HTTP: the request's id and record, the X-Request-ID and X-Model-Digest headers, the log line."""

    def __init__(self, app, state):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        record = RequestRecord(request_id(headers.get(REQUEST_ID)), f"{scope['method']} {logged_path(scope)}",
                               traceparent(headers.get(TRACEPARENT)))
        token = current.set(record)
        status = 500

        async def send_with_headers(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                extra = [(REQUEST_ID.encode(), record.request_id.encode())]
                if self.state.peers.index is not None:  # which server process answered
                    extra.append((b"x-worker", str(self.state.peers.index).encode()))
                if self.state.model_digest:
                    extra.append((MODEL_DIGEST.encode(), self.state.model_digest[:12].encode()))
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            current.reset(token)
            if not scope["path"].startswith(("/healthz", "/readyz", "/metrics", "/v2/health")):
                log.info(record.line(status))
