"""OpenAI's error format, and every failure turned into it.

Every error leaves the gateway as ``{"error": {"message", "type", "param",
"code"}}`` with a fitting status: request validation, worker error chunks,
control-plane failures, unknown routes and unexpected exceptions alike.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from qwen_vllm.serving.client import (
    BackendError,
    ControllerUnavailableError,
    NoWorkerError,
    UnknownModelError,
    WorkerTimeoutError,
)
from qwen_vllm.serving.protocol import ErrorCode, GenerateChunk

logger = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "server_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}
# Pydantic names union members in error locations ("str", "list[str]",
# "NamedToolChoice"); only field names and indices make a parameter path.
_FIELD = re.compile(r"[a-z_][a-z0-9_]*")
_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none"}


class APIError(Exception):
    """An error answered to the client in OpenAI's format."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _TYPES.get(status, "server_error")
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), self.status, headers=self.headers)


def bad_request(
    message: str, param: str | None, code: str = "invalid_value"
) -> APIError:
    return APIError(400, message, param=param, code=code)


def from_backend(exc: BackendError) -> APIError:
    if isinstance(exc, UnknownModelError):
        return APIError(
            404,
            f"The model {exc.model!r} does not exist.",
            param="model",
            code="model_not_found",
        )
    if isinstance(exc, NoWorkerError):
        return APIError(503, str(exc), code="no_healthy_worker")
    if isinstance(exc, ControllerUnavailableError):
        return APIError(503, str(exc), code="controller_unavailable")
    if isinstance(exc, WorkerTimeoutError):
        return APIError(504, str(exc), code="worker_timeout")
    return APIError(502, str(exc) or "The worker failed.", code="worker_error")


def from_chunk(chunk: GenerateChunk, prompt_param: str) -> APIError:
    """The error a worker reported in a chunk (FastChat's error codes)."""
    message = chunk.text or "The worker failed."
    code = chunk.error_code
    if code == ErrorCode.CONTEXT_OVERFLOW:
        return bad_request(message, prompt_param, "context_length_exceeded")
    if code == ErrorCode.PARAM_OUT_OF_RANGE:
        named = [name for name in ("max_tokens", "max_length") if name in message]
        return bad_request(message, named[0] if named else None)
    if code == ErrorCode.VALIDATION_TYPE_ERROR:
        return bad_request(message, None)
    if code == ErrorCode.INVALID_MODEL:
        return APIError(404, message, param="model", code="model_not_found")
    if code in (ErrorCode.RATE_LIMIT, ErrorCode.QUOTA_EXCEEDED):
        return APIError(429, message, code="rate_limit_exceeded")
    if code in (ErrorCode.ENGINE_OVERLOADED, ErrorCode.CONTROLLER_NO_WORKER):
        return APIError(503, message, code="overloaded")
    if code == ErrorCode.CONTROLLER_WORKER_TIMEOUT:
        return APIError(504, message, code="worker_timeout")
    return APIError(502, message, code="worker_error")


def param_path(loc: Sequence[Any]) -> str | None:
    """("body", "messages", 0, "role") -> "messages[0].role"."""
    path = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif (
            isinstance(part, str) and _FIELD.fullmatch(part) and part not in _TYPE_NAMES
        ):
            path += f".{part}" if path else part
    return path or None


def from_validation(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if not errors:
        return bad_request("The request is invalid.", None)
    first = errors[0]
    if first.get("type") == "json_invalid":
        return bad_request("The request body is not valid JSON.", None, "invalid_json")
    param = param_path(first.get("loc", ()))
    if param is None:
        if first.get("type") == "missing":
            return bad_request("A JSON request body is required.", None)
        return bad_request(f"Invalid request: {first.get('msg')}.", None)
    if first.get("type") == "missing":
        return bad_request(
            f"Missing required parameter '{param}'.",
            param,
            "missing_required_parameter",
        )
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return bad_request(f"Invalid value for '{param}': {message}", param)


def install_error_handlers(app: FastAPI) -> None:
    async def api_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, APIError)
        return exc.response()

    async def backend_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, BackendError)
        return from_backend(exc).response()

    async def validation_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return from_validation(exc).response()

    async def http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        return APIError(
            exc.status_code,
            str(exc.detail),
            headers=exc.headers,
            code="not_found" if exc.status_code == 404 else None,
        ).response()

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("Unhandled error on %s", request.url.path)
        return APIError(500, "Internal server error.").response()

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(BackendError, backend_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
