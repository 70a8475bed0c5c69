"""HTTP errors in OpenAI's JSON shape, and which engine error becomes which status code.

400 invalid_request_error   bad parameters, malformed JSON, a prompt too long
401 authentication_error    a missing or wrong API key
404 not_found_error         an unknown model or path
413 invalid_request_error   a body over the server's limit
503 service_unavailable     the engine is dead, stopped, or its waiting queue is full
                            (with `Retry-After`)
500 server_error            anything else (logged with its traceback)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from asyncllm import errors

__all__ = [
    "APIError",
    "error_body",
    "error_response",
    "from_engine_error",
    "install_error_handlers",
]

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    500: "server_error",
    503: "service_unavailable",
}

RETRY_AFTER_S = 1
"""What a 503 asks the client to wait before retrying (seconds)."""


class APIError(Exception):
    """An error the server answers with `status` and OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, param=self.param, code=self.code)

    def response(self) -> JSONResponse:
        return error_response(
            self.status, self.message, param=self.param, code=self.code, headers=self.headers
        )


def error_response(
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """A JSON response `{"error": {...}}` with `status`."""
    body = error_body(status, message, param=param, code=code)
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


def error_body(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error object: `{"error": {"message", "type", "param", "code"}}`."""
    kind = _TYPES.get(status, "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def from_engine_error(exc: errors.AsyncLLMError) -> APIError:
    """The HTTP answer to an error the engine raised at submission (or while running)."""
    if isinstance(exc, errors.PromptTooLongError):
        return APIError(400, str(exc), param="prompt", code="context_length_exceeded")
    if isinstance(exc, errors.InvalidRequestError):
        return APIError(400, str(exc))
    if isinstance(exc, errors.EngineOverloadedError):
        return APIError(503, str(exc), code="overloaded", headers=_retry_after())
    if isinstance(exc, errors.EngineError):
        return APIError(503, f"the engine is not serving: {exc}", headers=_retry_after())
    return APIError(500, str(exc))


def _retry_after() -> dict[str, str]:
    return {"Retry-After": str(RETRY_AFTER_S)}


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error of `app` in OpenAI's shape."""

    async def api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, APIError)
        return exc.response()

    async def engine_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, errors.AsyncLLMError)
        return from_engine_error(exc).response()

    async def invalid_body(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        message, param = describe_validation_error(exc.errors())
        return error_response(400, message, param=param)

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        return error_response(exc.status_code, str(exc.detail), headers=exc.headers)

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises it after this answer, so the ASGI server logs the traceback.
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(errors.AsyncLLMError, engine_error)
    app.add_exception_handler(RequestValidationError, invalid_body)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)


_UNION_HINTS = {
    "prompt": "text, a list of token ids, or a list of either",
    "stop": "a string or a list of strings",
    "messages": "a list of {role, content} objects",
}
"""What a field that accepts several forms accepts (pydantic reports each form's failure)."""


def describe_validation_error(problems: Any) -> tuple[str, str | None]:
    """A one-line message (and the offending field) for pydantic's list of problems."""
    first = problems[0] if problems else {}
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return f"malformed JSON body: {detail}".rstrip(": "), None
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    message = first.get("msg", "invalid request")
    if first.get("type") == "extra_forbidden":
        message = "unknown or unsupported field"
    if not location:
        return f"the request body must be a JSON object ({message})", None
    # OpenAI's `param` names the top-level field; the message keeps the full path.
    field = location[0]
    if field in _UNION_HINTS and sum(_field_of(p) == field for p in problems) > 1:
        return f"{field} must be {_UNION_HINTS[field]}", field
    return f"{'.'.join(location)}: {message}", field


def _field_of(problem: Any) -> str | None:
    location = [str(part) for part in problem.get("loc", ()) if part != "body"]
    return location[0] if location else None
