"""OpenAI's error shape, ``{"error": {"message", "type", "param", "code"}}``, for every failure.

Clients (the ``openai`` package, Open WebUI, Continue) show ``error.message`` to the user, so each
message says what was wrong and what to send instead.
"""

from __future__ import annotations

import logging
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException
from litestar.types import ExceptionHandlersMap

from neuroscope.engine import EngineError, PromptTooLong
from neuroscope.errors import ConfigError

log = logging.getLogger("neuroscope.server")

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"


class APIError(Exception):
    """An error response in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str, type: str = INVALID_REQUEST, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def from_exception(exc: BaseException, param: str | None = None) -> APIError:
    """The API error for an engine or configuration error raised while serving a request."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, PromptTooLong):
        return APIError(400, str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, EngineError):
        codes = {409: "duplicate_request_id", 429: "server_busy", 503: "shutting_down"}
        kind = INVALID_REQUEST if exc.status < 500 else SERVER_ERROR
        if exc.status == 429:
            kind = "rate_limit_error"
        return APIError(exc.status, str(exc), type=kind, code=codes.get(exc.status))
    if isinstance(exc, ConfigError):
        return APIError(400, str(exc), param=param)
    return APIError(
        500, "Internal server error; the server log has the details.", type=SERVER_ERROR
    )


def _respond(err: APIError) -> Response[dict[str, Any]]:
    return Response(err.body(), status_code=err.status, headers=err.headers)


def handle_api_error(request: Request, exc: Exception) -> Response[dict[str, Any]]:
    return _respond(from_exception(exc))


def handle_http_exception(request: Request, exc: HTTPException) -> Response[dict[str, Any]]:
    """Litestar's own errors (unknown route, wrong method, body too large) in OpenAI's shape."""
    status = exc.status_code
    if status == 404:
        message = f"No route {request.method} {request.url.path}. See GET /v1/models and the docs."
        code = "not_found"
    elif status == 405:
        message = f"{request.method} is not allowed on {request.url.path}."
        code = "method_not_allowed"
    else:
        message, code = str(exc.detail), None
    kind = INVALID_REQUEST if status < 500 else SERVER_ERROR
    return _respond(APIError(status, message, type=kind, code=code, headers=exc.headers))


def handle_unexpected(request: Request, exc: Exception) -> Response[dict[str, Any]]:
    log.exception("Unhandled error serving %s %s", request.method, request.url.path)
    return _respond(from_exception(exc))


EXCEPTION_HANDLERS: ExceptionHandlersMap = {
    APIError: handle_api_error,
    EngineError: handle_api_error,
    ConfigError: handle_api_error,
    HTTPException: handle_http_exception,
    Exception: handle_unexpected,
}
