"""The one table from failures to HTTP status and OpenAI error envelope.

Every error response, ours or the framework's (validation, unknown path, wrong method),
leaves through ``error_response`` so clients always get
``{"error": {"message", "type", "param", "code"}}`` plus the request id.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection

from diffuser_api.api.request_record import record_of
from diffuser_api.errors import (
    BodyTimeout,
    Cancelled,
    Conflict,
    DiffuserError,
    Forbidden,
    Gone,
    InvalidRequest,
    ModelFailure,
    ModelNotFound,
    NotFound,
    NotSupported,
    Overloaded,
    PayloadTooLarge,
    RateLimited,
    RequestTimeout,
    ServerBusy,
    Unauthorized,
    Unavailable,
)

logger = logging.getLogger(__name__)

# status, OpenAI error type, and whether the SDK should retry (None: let it decide by status).
ERROR_TABLE: dict[type[DiffuserError], tuple[int, str, bool | None]] = {
    InvalidRequest: (400, "invalid_request_error", None),
    Unauthorized: (401, "invalid_request_error", False),
    Forbidden: (403, "invalid_request_error", False),
    ModelNotFound: (404, "invalid_request_error", None),
    NotFound: (404, "invalid_request_error", None),
    BodyTimeout: (408, "invalid_request_error", None),
    Conflict: (409, "invalid_request_error", False),
    Gone: (410, "invalid_request_error", False),
    PayloadTooLarge: (413, "invalid_request_error", False),
    Overloaded: (429, "requests", None),
    RateLimited: (429, "requests", None),
    Cancelled: (499, "invalid_request_error", False),
    ModelFailure: (500, "server_error", None),
    NotSupported: (501, "not_supported_error", False),
    Unavailable: (503, "server_error", None),
    ServerBusy: (503, "server_error", None),
    RequestTimeout: (504, "timeout_error", False),
}


def request_id_of(request: HTTPConnection) -> str:
    return getattr(request.state, "request_id", "")


def envelope(
    request_id: str, message: str, error_type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code, "request_id": request_id}}


def error_response(
    request: HTTPConnection,
    status: int,
    message: str,
    error_type: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = envelope(request_id_of(request), message, error_type, param, code)
    return JSONResponse(body, status_code=status, headers=headers)


def error_kind(kind: type[DiffuserError]) -> tuple[int, str, bool | None]:
    """The table's row for a failure class (its nearest listed ancestor's)."""
    return next((ERROR_TABLE[base] for base in kind.__mro__ if base in ERROR_TABLE), (500, "server_error", None))


def describe_error(error: DiffuserError, request_id: str) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Status, envelope and headers of one of our errors: the table, applied."""
    status, error_type, should_retry = error_kind(type(error))
    headers: dict[str, str] = {}
    if should_retry is not None:
        headers["x-should-retry"] = str(should_retry).lower()
    retry_after = getattr(error, "retry_after", None)
    if retry_after is not None:
        headers["retry-after"] = f"{retry_after:g}"
    if status == 401:
        headers["www-authenticate"] = "Bearer"
    message = error.message
    if status == 500:
        message = f"{message} (request id {request_id})"
        # The cause (a pipeline's exception) is the operator's to read, next to the request id.
        logger.warning("request %s failed: %s", request_id, error.message, exc_info=error.__cause__)
    return status, envelope(request_id, message, error_type, error.param, error.code), headers


async def diffuser_error_handler(request: HTTPConnection, error: DiffuserError) -> JSONResponse:
    record_of(request).error_type = type(error).__name__
    status, body, headers = describe_error(error, request_id_of(request))
    return JSONResponse(body, status_code=status, headers=headers)


# Pydantic's type errors (a JSON body is strict) in OpenAI's words: "expected an integer".
EXPECTED_TYPES = {"int_type": "an integer", "float_type": "a number", "bool_type": "a boolean",
                  "string_type": "a string", "list_type": "an array", "dict_type": "an object",
                  "model_type": "an object", "model_attributes_type": "an object"}
JSON_TYPES = ((bool, "a boolean"), (int, "an integer"), (float, "a decimal number"), (str, "a string"),
              (list, "an array"), (dict, "an object"))


def _json_type(value: Any) -> str:
    """What a JSON value is, in words (bool before int: a bool is an int in Python)."""
    if value is None:
        return "null"
    return next((words for kind, words in JSON_TYPES if isinstance(value, kind)), type(value).__name__)


def invalid_request_from(errors: list[dict[str, Any]]) -> InvalidRequest:
    """Pydantic's first complaint, in OpenAI's words, naming the field."""
    first = errors[0]
    names = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path")]
    param = ".".join(names) or None
    if first.get("type") == "missing":
        return InvalidRequest(f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    if first.get("type") == "json_invalid":
        return InvalidRequest("The request body is not valid JSON.", code="invalid_json")
    if param is None and isinstance(first.get("input"), bytes):  # a form or text where the route reads JSON
        return InvalidRequest("this endpoint takes a JSON body (Content-Type: application/json)",
                              code="invalid_content_type")
    if expected := EXPECTED_TYPES.get(first.get("type", "")):
        what = f"Invalid type for '{param}'" if param else "Invalid type for the request body"
        return InvalidRequest(f"{what}: expected {expected}, but got {_json_type(first.get('input'))} instead.",
                              param=param, code="invalid_type")
    message = first.get("msg", "invalid value")
    return InvalidRequest(f"Invalid value for '{param}': {message}." if param else f"{message}.", param=param,
                          code="invalid_value")


async def validation_error_handler(request: Request, error: RequestValidationError) -> JSONResponse:
    return await diffuser_error_handler(request, invalid_request_from(list(error.errors())))


async def pydantic_error_handler(request: Request, error: ValidationError) -> JSONResponse:
    return await diffuser_error_handler(request, invalid_request_from(list(error.errors())))


async def http_error_handler(request: Request, error: HTTPException) -> JSONResponse:
    if error.status_code == 404:
        message = f"Invalid URL ({request.method} {request.url.path})"
    elif error.status_code == 405:
        message = f"Method {request.method} is not allowed on {request.url.path}"
    else:
        message = str(error.detail)
    error_type = "invalid_request_error" if error.status_code < 500 else "server_error"
    return error_response(request, error.status_code, message, error_type, headers=error.headers)


async def unexpected_error_handler(request: Request, error: Exception) -> JSONResponse:
    """A bug of ours: log it with the request id, answer 500, keep serving."""
    logger.exception("unhandled error in request %s", request_id_of(request))
    message = f"The server had an error while processing your request (request id {request_id_of(request)})."
    return error_response(request, 500, message, "server_error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(DiffuserError, diffuser_error_handler)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, validation_error_handler)  # type: ignore[arg-type]
    app.add_exception_handler(ValidationError, pydantic_error_handler)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, http_error_handler)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, unexpected_error_handler)
