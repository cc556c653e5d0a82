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

MAX_MESSAGE_CHARS = 1024

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
    message = str(exc)  # messages repeat input only through guard.echo; this bounds any that slip through
    await context.abort(code, message if len(message) <= MAX_MESSAGE_CHARS else message[:MAX_MESSAGE_CHARS] + "...")


@contextlib.asynccontextmanager
async def grpc_status(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    """Inside a servicer method: an exception becomes the call's status through STATUS_BY_ERROR. Used directly in
    streaming methods (so the method's own generator is the only one between gRPC and the engine) and through
    `unary_errors` in unary ones. Cancellation and generator exits pass through untouched."""
    try:
        yield
    except grpc.aio.AbortError:
        raise
    except Exception as exc:  # noqa: BLE001 - every error gets a deliberate status
        await _abort(context, exc)


def unary_errors(method: Callable[..., Awaitable]) -> Callable[..., Awaitable]:
    @functools.wraps(method)
    async def wrapper(self, request, context):
        async with grpc_status(context):
            return await method(self, request, context)

    return wrapper
