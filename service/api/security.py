"""Optional API key, when ACMIX_API_KEY is set: header X-API-Key, or Authorization with the scheme
Bearer (in any case, RFC 7235), over HTTP; the same two as gRPC metadata (service/kserve_grpc).

`check_key` is the one check; `require_api_key` applies it as a FastAPI dependency (which also puts
the schemes in the API docs), and `KeyBeforeUploadMiddleware` before /predict's upload is read:
FastAPI parses a form before any dependency runs, so a bad or slow upload without a key got 400 or
408 where it should get 401.
"""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from starlette.datastructures import Headers

from service.errors import Unauthenticated, send_http_error

api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False)
bearer = HTTPBearer(auto_error=False)
# The routes whose body is a form, parsed before dependencies run.
UPLOAD_PATHS = ("/predict",)


def check_key(expected: str | None, api_key: str | None, authorization: str | None) -> None:
    """Unauthenticated unless no key is expected or one of the two carries it."""
    if not expected:
        return
    scheme, credentials = get_authorization_scheme_param(authorization)
    given = api_key or (credentials if scheme.lower() == "bearer" and credentials else None)
    if given is None or not secrets.compare_digest(given.encode(), expected.encode()):
        raise Unauthenticated("missing or wrong API key (X-API-Key, or Authorization: Bearer <key>)")


async def require_api_key(
    request: Request,
    key: Annotated[str | None, Depends(api_key_header)],
    _: Annotated[object, Depends(bearer)],  # declared for the API docs; check_key reads the header itself
) -> None:
    check_key(request.app.state.service.settings.api_key, key, request.headers.get("authorization"))


class KeyBeforeUploadMiddleware:
    """A POST to an UPLOAD_PATHS route without the key gets its 401 before its body is read."""

    def __init__(self, app, state):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"].startswith(UPLOAD_PATHS):
            headers = Headers(scope=scope)
            try:
                check_key(self.state.settings.api_key, headers.get("x-api-key"), headers.get("authorization"))
            except Unauthenticated as exc:
                return await send_http_error(send, scope["path"], exc.status, exc.message, exc.headers())
        await self.app(scope, receive, send)
