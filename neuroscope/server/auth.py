"""An optional bearer token (``--api-key``) on both servers.

A plain ASGI wrapper, so it runs before routing and covers every ``/v1/`` path alike. ``/health``
and the visualiser page stay open: health checks and browsers' ``EventSource`` cannot send headers.
The key is compared in constant time and never echoed or logged.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from neuroscope.server.errors import error_body

PROTECTED_PREFIX = "/v1/"

ASGIApp = Any  # (scope, receive, send) -> awaitable


def bearer_token(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


class BearerAuth:
    """Answers 401 in OpenAI's shape unless ``Authorization: Bearer <api_key>`` is sent."""

    def __init__(self, app: ASGIApp, api_key: str):
        if not api_key:
            raise ValueError("BearerAuth needs a non-empty API key.")
        self.app = app
        self._key = api_key.encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith(PROTECTED_PREFIX):
            token = bearer_token(scope.get("headers", []))
            if token is None or not hmac.compare_digest(token.encode(), self._key):
                await _unauthorized(send, missing=token is None)
                return
        await self.app(scope, receive, send)


async def _unauthorized(send: Any, missing: bool) -> None:
    if missing:
        message = (
            "This server requires an API key: send the header 'Authorization: Bearer <key>' "
            "(the key neuroscope serve was started with)."
        )
    else:
        message = "Incorrect API key provided."
    body = json.dumps(error_body(message, code="invalid_api_key")).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 401,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"www-authenticate", b'Bearer realm="neuroscope"'),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


def with_auth(app: ASGIApp, api_key: str | None) -> ASGIApp:
    return BearerAuth(app, api_key) if api_key else app
