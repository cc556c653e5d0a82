"""Map domain errors to gRPC status codes on purpose, in one place (architecture.md, boundary 6)."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from prunefusion.server.engines.base import EngineUnavailableError, InvalidRequestError, QueueFullError
from prunefusion.server.registry import ModelNotFoundError

log = logging.getLogger(__name__)

STATUS_BY_ERROR: dict[type[BaseException], grpc.StatusCode] = {
    InvalidRequestError: grpc.StatusCode.INVALID_ARGUMENT,
    ModelNotFoundError: grpc.StatusCode.NOT_FOUND,
    QueueFullError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    EngineUnavailableError: grpc.StatusCode.UNAVAILABLE,
    TimeoutError: grpc.StatusCode.DEADLINE_EXCEEDED,
}


async def _abort(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    code = next((c for t, c in STATUS_BY_ERROR.items() if isinstance(exc, t)), None)
    if code is None:
        log.exception("internal error", exc_info=exc)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")
    if isinstance(exc, QueueFullError):  # standard pushback hint for gRPC clients' retry logic
        context.set_trailing_metadata((("grpc-retry-pushback-ms", str(int(exc.retry_after_s * 1000))),))
    await context.abort(code, str(exc))


def unary_errors(method: Callable[..., Awaitable]) -> Callable[..., Awaitable]:
    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except Exception as exc:  # noqa: BLE001 - every error gets a deliberate status
            if isinstance(exc, grpc.aio.AbortError):
                raise
            await _abort(context, exc)

    return wrapper


def stream_errors(method: Callable[..., AsyncIterator]) -> Callable[..., AsyncIterator]:
    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            # aclosing: when the client cancels while a message is being written, close the inner stream now
            # (its cleanup frees the engine slot) instead of whenever it is garbage collected
            async with contextlib.aclosing(method(self, request, context)) as items:
                async for item in items:
                    yield item
        except Exception as exc:  # noqa: BLE001
            if isinstance(exc, grpc.aio.AbortError):
                raise
            await _abort(context, exc)

    return wrapper
