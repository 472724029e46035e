"""HTTP errors in the OpenAI shape: `{"error": {"message", "type", "param", "code"}}`, and under
Ollama's routes (`/api/...`) in Ollama's: `{"error": "message"}`.

Every refusal the server makes is an `APIError`; the handlers installed by `install_handlers` turn it,
FastAPI's own validation errors, Starlette's HTTP exceptions (unknown route, wrong method) and, as a
last resort, any other exception into that shape, so no response body is ever a bare traceback."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("tramontane.serve")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """A refusal with its HTTP status; `param` names the request field at fault."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None, type: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPES.get(status, "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def ollama_body(self) -> dict[str, Any]:
        return {"error": self.message}

    def response(self, path: str = "") -> JSONResponse:
        """The error as a response to a request for `path` (Ollama's shape under OLLAMA_PREFIX)."""
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        body = self.ollama_body() if path.startswith(OLLAMA_PREFIX) else self.body()
        return JSONResponse(body, status_code=self.status, headers=headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


class BodyTooLarge(APIError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is larger than the limit of {limit} bytes", code="request_too_large")


OLLAMA_PREFIX = "/api/"  # Ollama's routes (routes_ollama.py) answer errors in Ollama's shape

_UNION_TAGS = frozenset({"str", "int", "float", "bool", "none", "dict", "list"})


def _loc_name(loc: Sequence[Any]) -> str | None:
    """('body', 'messages', 0, 'role') -> 'messages[0].role'."""
    name = ""
    for part in loc:
        if part in ("body", "query", "path"):
            continue
        if isinstance(part, int):
            name += f"[{part}]"
        elif str(part) not in _UNION_TAGS and "[" not in str(part):  # skip "str", "list[int]"...
            name += f".{part}" if name else str(part)
    return name or None


def validation_error(errors: Sequence[Any]) -> APIError:
    """A 422 from pydantic's error list, naming the first field at fault."""
    first = dict(errors[0]) if errors else {}
    param = _loc_name(first.get("loc", ()))
    detail = str(first.get("msg", "invalid request body"))
    message = f"{param}: {detail}" if param else detail
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return APIError(422, message, param=param, code="invalid_type")


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return exc.response(request.url.path)


async def _request_validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, (RequestValidationError, ValidationError))
    return validation_error(exc.errors()).response(request.url.path)


async def _http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        message = f"no route {request.method} {request.url.path[:200]}"
    elif exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path[:200]}"
    else:
        message = str(exc.detail)
    return APIError(exc.status_code, message).response(request.url.path)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("internal error on %s %s", request.method, request.url.path, exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}", code="internal_error").response(request.url.path)


def install_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _request_validation)
    app.add_exception_handler(ValidationError, _request_validation)
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    app.add_exception_handler(Exception, _unexpected)
