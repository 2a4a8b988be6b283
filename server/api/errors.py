"""OpenAI-style error bodies and the exception handlers that produce them.

Body: {"error": {"message": str, "type": str, "param": str | null, "code": str | int | null}}.
Every failure a client can cause maps to a 4xx here (malformed JSON and type errors are 400,
as in vLLM, not FastAPI's 422); only a bug in this server may surface as a 500.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

logger = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    499: "client_closed_request",
    500: "internal_server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """Raise anywhere in a handler to answer with this status and an OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | int | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retry_after = retry_after


def error_body(
    status: int, message: str, param: str | None = None, code: str | int | None = None
) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error"),
            "param": param,
            "code": code if code is not None else status,
        }
    }


def error_response(exc: APIError) -> Response:
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
    return Response(
        msgspec.json.encode(error_body(exc.status, exc.message, exc.param, exc.code)),
        status_code=exc.status,
        media_type="application/json",
        headers=headers,
    )


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts, param = [], None
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            return f"Request body is not valid JSON: {err.get('msg', '')}", None
        if not loc:  # the body as a whole, not one of its fields
            return _body_message(err), None
        where = ".".join(loc)
        param = param or (loc[0] if loc else None)
        parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else err.get("msg", ""))
    return "; ".join(parts) or "Invalid request body.", param


def _body_message(err: Any) -> str:
    """FastAPI parses the body as JSON only under a JSON Content-Type; otherwise it arrives as
    bytes (curl -d sends application/x-www-form-urlencoded), and pydantic's own message ("Input
    should be a valid dictionary ...") does not say why."""
    if err.get("type") == "missing":
        return "Request body is missing: send a JSON object with Content-Type: application/json."
    if isinstance(err.get("input"), (bytes, str)):
        return "Request body was not read as JSON: send it with Content-Type: application/json."
    return "Request body must be a JSON object."


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> Response:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        message, param = _validation_message(exc)
        return error_response(APIError(400, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        return error_response(APIError(exc.status_code, message))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(APIError(500, f"Internal server error: {type(exc).__name__}"))
