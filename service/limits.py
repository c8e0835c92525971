"""A deadline for receiving a request's body: a client that sends it too slowly (slowloris) gets a
408 and its connection back, instead of holding a server task for as long as it likes."""

from __future__ import annotations

import asyncio
import json
import time


class BodyTooSlow(Exception):
    pass


class BodyTimeoutMiddleware:
    def __init__(self, app, seconds: float):
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        deadline = time.monotonic() + self.seconds
        started = timed_out = False

        async def receive_in_time():
            nonlocal timed_out
            remaining = deadline - time.monotonic()
            try:
                return await asyncio.wait_for(receive(), max(remaining, 0))
            except TimeoutError:
                timed_out = True
                raise BodyTooSlow from None

        async def send_timeout():
            nonlocal started
            started = True
            body = json.dumps({"detail": f"the request body was not received within {self.seconds:g} s"}).encode()
            await send({"type": "http.response.start", "status": 408,
                        "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": body})

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
