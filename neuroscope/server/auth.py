"""An optional bearer token (``--api-key``) on both servers, decided on the route the router matched.

The check is a Litestar guard on the whole app: it runs after routing, on the route handler the
request actually reached, so no spelling of a path (``//v1/models``, ``/%2Fv1/models``, ``/v1/./x``)
can reach a handler without it. A path that matches no route is a 404 and reaches nothing. The open
list is declared on the routes themselves (``opt={"open": True}``, see :data:`OPEN`): ``/health``
(health checks send no headers) and the visualiser page's static files (a browser loads them before
the user can type a key). The key is compared in constant time and never echoed or logged.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from typing import Any

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler
from litestar.types import Guard

from neuroscope.server.errors import APIError

OPEN_OPT = "open"
OPEN: dict[str, Any] = {
    OPEN_OPT: True
}  # route handler ``opt`` for the routes the key does not cover
WWW_AUTHENTICATE = {"WWW-Authenticate": 'Bearer realm="neuroscope"'}


def bearer_token(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


def key_matches(headers: Iterable[tuple[bytes, bytes]], key: str) -> bool:
    token = bearer_token(headers)
    return token is not None and hmac.compare_digest(token.encode(), key.encode())


def require_api_key(api_key: str) -> Guard:
    """A guard that answers 401 in OpenAI's shape unless ``Authorization: Bearer <api_key>`` is sent
    or the matched route is on the open list."""
    if not api_key:
        raise ValueError("require_api_key needs a non-empty API key.")

    def guard(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
        if handler.opt.get(OPEN_OPT):
            return
        headers = connection.scope.get("headers", [])
        if key_matches(headers, api_key):
            return
        if bearer_token(headers) is None:
            message = (
                "This server requires an API key: send the header 'Authorization: Bearer <key>' "
                "(the key neuroscope serve was started with)."
            )
        else:
            message = "Incorrect API key provided."
        raise APIError(401, message, code="invalid_api_key", headers=WWW_AUTHENTICATE)

    return guard


def guards(api_key: str | None) -> list[Guard]:
    """The app-level guards for ``api_key`` (none when no key is set)."""
    return [require_api_key(api_key)] if api_key else []
