"""Limits on receiving a request's body, both answered in the API's JSON error format:

* a size limit: a body over it gets a 413 naming the limit, at once where Content-Length declares
  it, else as soon as the bytes received pass it;
* a deadline: a client that sends its body too slowly (slowloris) gets a 408 and its connection
  back, instead of holding a server task for as long as it likes;
* a client that goes away before the answer: its request ends with status 499 (nginx's "client
  closed request") in the log and the metrics, whatever the app made of the missing body (a
  ClientDisconnect raised from reading it, FastAPI's 400 for a form cut short), and no traceback.

The size limit is not Starlette's (FastAPI's `max_body_size`): that one replaces every response to
a request whose Content-Length is over the limit with a plain-text "Content Too Large", which
tritonclient cannot read as an error."""

from __future__ import annotations

import asyncio
import time

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from service.errors import send_http_error


class BodyTooSlow(Exception):
    pass


# Not an HTTP status; nginx's for a request whose client closed the connection before the answer.
CLIENT_CLOSED = 499


class ClientGoneMiddleware:
    """A request whose client disconnected before the response started ends as CLIENT_CLOSED: the
    status the app sends is replaced (nobody reads it), and a ClientDisconnect from reading the
    body ends the request instead of reaching the server's error handler. Once its body is in, the
    connection is watched: a client that goes away while its request waits for a batch (a client
    timeout, a retry) cancels the request, so that its images leave the queue uncomputed
    (service/batching.py), as a gRPC call its client cancels does."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        gone = started = False
        request_task, watcher = asyncio.current_task(), None

        async def watch_for_disconnect():
            nonlocal gone
            message = await receive()  # after the body: the client gone, or the response done
            if message["type"] == "http.disconnect" and not started:
                gone = True
                request_task.cancel()

        async def receive_noting_disconnect():
            nonlocal gone, watcher
            message = await receive()
            if message["type"] == "http.disconnect" and not started:
                gone = True
            elif message["type"] == "http.request" and not message.get("more_body", False) and watcher is None:
                watcher = asyncio.get_running_loop().create_task(watch_for_disconnect())
            return message

        async def send_as_closed(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if gone:
                    message = {**message, "status": CLIENT_CLOSED}
            await send(message)

        try:
            await self.app(scope, receive_noting_disconnect, send_as_closed)
        except ClientDisconnect:
            if started:
                raise
            gone = True
        except asyncio.CancelledError:
            if not gone or started or request_task.cancelling() != 1:  # not (only) the watcher's doing
                raise
            request_task.uncancel()
        else:
            return
        finally:
            if watcher is not None:
                watcher.cancel()
        await send_as_closed({"type": "http.response.start", "status": CLIENT_CLOSED, "headers": []})
        await send_as_closed({"type": "http.response.body", "body": b""})


class UploadLimitMiddleware:
    """Raises a 413 HTTPException into the app from `receive`, which the app's exception handler
    answers: before reading anything where Content-Length is over the limit, else once the body
    received so far is. A request whose body is never read is not refused. An HTTPException, at this
    edge, rather than the service's TooLarge: FastAPI turns any other exception raised while it
    parses a form body into a 400 ("There was an error parsing the body")."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = declared_length(scope)
        received = 0

        async def receive_within_limit():
            nonlocal received
            if declared is not None and declared > self.max_bytes:
                raise self.too_large()
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self.too_large()
            return message

        await self.app(scope, receive_within_limit, send)

    def too_large(self) -> HTTPException:
        return HTTPException(413, f"request body over the upload limit of {self.max_bytes} bytes")


def declared_length(scope) -> int | None:
    """The request's Content-Length, None where it has none or an unreadable one."""
    try:
        return int(Headers(scope=scope)["content-length"])
    except (KeyError, ValueError):
        return None


class BodyTimeoutMiddleware:
    def __init__(self, app, seconds: float):
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        deadline = time.monotonic() + self.seconds
        started = timed_out = body_in = False

        async def receive_in_time():
            nonlocal timed_out, body_in
            if body_in:  # the deadline is the body's: waiting for a disconnect after it has none
                return await receive()
            remaining = deadline - time.monotonic()
            try:
                message = await asyncio.wait_for(receive(), max(remaining, 0))
            except TimeoutError:
                timed_out = True
                raise BodyTooSlow from None
            body_in = message["type"] == "http.request" and not message.get("more_body", False)
            return message

        async def send_timeout():
            nonlocal started
            started = True
            await send_http_error(send, scope["path"], 408,
                                  f"the request body was not received within {self.seconds:g} s", {"connection": "close"})

        async def send_unless_timed_out(message):
            # Once the body ran late, the client gets the 408 whatever the app answers: FastAPI's
            # form parser turns any error while reading the body into its own 400.
            nonlocal started
            if timed_out:
                if not started:
                    await send_timeout()
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive_in_time, send_unless_timed_out)
        except BodyTooSlow:
            if not started:
                await send_timeout()
