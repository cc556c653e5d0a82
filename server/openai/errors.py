"""Domain errors -> HTTP statuses and OpenAI's error body, in one table (as server/errors.py does for gRPC)."""

from __future__ import annotations

import logging
import math

import grpc
from fastapi.responses import JSONResponse

from prunefusion.server.auth.interceptor import Refusal
from prunefusion.server.engines.base import EngineUnavailableError, InvalidRequestError, QueueFullError
from prunefusion.server.errors import MAX_MESSAGE_CHARS
from prunefusion.server.openai.schemas import PARAM_NAMES
from prunefusion.server.registry import ModelNotFoundError

log = logging.getLogger(__name__)

# exception class -> (HTTP status, OpenAI error type, code)
HTTP_BY_ERROR: dict[type[BaseException], tuple[int, str, str | None]] = {
    InvalidRequestError: (400, "invalid_request_error", None),
    ModelNotFoundError: (404, "not_found_error", "model_not_found"),
    QueueFullError: (429, "rate_limit_error", "queue_full"),
    EngineUnavailableError: (503, "service_unavailable_error", "not_ready"),
    TimeoutError: (504, "timeout_error", "deadline_exceeded"),
}
# an API-key refusal's gRPC code -> (HTTP status, OpenAI error type)
HTTP_BY_REFUSAL = {
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
}


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS] + "..."
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def describe(exc: BaseException) -> tuple[int, dict, float | None]:
    """(status, body, retry-after seconds or None) for an exception raised while answering."""
    if isinstance(exc, Refusal):
        status, type_ = HTTP_BY_REFUSAL.get(exc.code, (403, "permission_error"))
        return status, error_body(str(exc), type_, code=exc.code.name.lower()), exc.retry_after_s
    match = next((v for t, v in HTTP_BY_ERROR.items() if isinstance(exc, t)), None)
    if match is None:
        log.exception("internal error", exc_info=exc)
        return 500, error_body(f"internal error: {type(exc).__name__}", "server_error"), None
    status, type_, code = match
    param = PARAM_NAMES.get(exc.field, exc.field) if isinstance(exc, InvalidRequestError) else None
    message = str(exc)
    if param is not None and isinstance(exc, InvalidRequestError) and exc.field != param:
        message = param + message[len(exc.field):]
    retry = exc.retry_after_s if isinstance(exc, QueueFullError) else None
    return status, error_body(message, type_, param, code), retry


def error_response(exc: BaseException) -> JSONResponse:
    status, body, retry = describe(exc)
    headers = {"Retry-After": str(max(1, math.ceil(retry)))} if retry is not None else None
    return JSONResponse(body, status_code=status, headers=headers)
