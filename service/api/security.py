"""Optional API key: X-API-Key header or Authorization: Bearer, when ACMIX_API_KEY is set."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from service.errors import Unauthenticated

api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False)
bearer = HTTPBearer(auto_error=False)


async def require_api_key(
    request: Request,
    key: Annotated[str | None, Depends(api_key_header)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    expected = request.app.state.service.settings.api_key
    if not expected:
        return
    given = key or (credentials.credentials if credentials else None)
    if given is None or not secrets.compare_digest(given.encode(), expected.encode()):
        raise Unauthenticated("missing or wrong API key (header X-API-Key)")
