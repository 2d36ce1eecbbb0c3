"""Bearer-token authentication of the ops API: 401 without a token, 403 with a wrong one.

Tokens are compared in constant time, every configured token is checked (no early exit that
would tell which prefix matched), and a token is never logged. The token's name is the actor
recorded in the audit trail.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr
from starlette.types import Message, Receive

_bearer = HTTPBearer(auto_error=False, description="An ops token from COURIER_OPS_TOKENS.")


def identify(tokens: Iterable[tuple[str, SecretStr]], presented: str) -> str | None:
    """The name of the token that matches, comparing against all in constant time."""
    found: str | None = None
    for name, token in tokens:
        if hmac.compare_digest(token.get_secret_value().encode(), presented.encode()):
            found = name
    return found


async def require_operator(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "an ops token is required (Authorization: Bearer <token>)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    actor = identify(request.app.state.settings.ops_tokens, credentials.credentials)
    if actor is None:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "this token may not use the ops API")
    return actor


Operator = Annotated[str, Depends(require_operator)]


async def authenticate(request: Request) -> str:
    """`require_operator` from the request's headers alone, before its body is read."""
    return await require_operator(request, await _bearer(request))


def bounded(receive: Receive, limit: int) -> Receive:
    """`receive` that refuses (413) a body growing past `limit` bytes as it arrives."""
    taken = 0

    async def receive_bounded() -> Message:
        nonlocal taken
        message = await receive()
        if message["type"] == "http.request":
            taken += len(message.get("body", b""))
            if taken > limit:
                raise HTTPException(
                    status.HTTP_413_CONTENT_TOO_LARGE, f"body larger than {limit} bytes"
                )
        return message

    return receive_bounded
