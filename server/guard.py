"""The first thing every call meets: its request parsed here, bounded before any work, refused as INVALID_ARGUMENT.

gRPC's own parsing turns bytes that are not the method's message (bad UTF-8, wrong wire types, truncation, deep
nesting) into UNKNOWN (unary) or INTERNAL (client streaming) with the exception's text and an ERROR traceback for
each call. So the guard takes every method's raw bytes and, per call:
1. bounds their size by the method's service (`RequestBounds`: a prompt is not 64 MiB because gRPC would accept
   that much) before parsing, since a parsed message costs several times its bytes;
2. parses them (a failure: INVALID_ARGUMENT "not a valid prunefusion.v1.X", logged once per call at DEBUG);
3. bounds every string field of the parsed message (`string_problem`): identifiers short and printable (no CR/LF
   to forge log lines with), bulk text only by the size bound.

It is the outermost interceptor: API keys are checked from metadata alone (before parsing; a refused call is not
parsed at all), and the key's model allow-list sees the parsed request.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message

from prunefusion.server.metrics import REQUESTS_REJECTED

log = logging.getLogger(__name__)

KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")  # RpcMethodHandler's behaviour fields
BULK_FIELDS = {"prompt", "text", "texts"}  # free text: bounded by the request's size only
IDENTIFIER_FIELDS = {"request_id", "model", "id", "duplicate_of"}  # logged and echoed: short, printable, one line
MAX_IDENTIFIER_CHARS = 256  # a document id may be a URL
MAX_OTHER_STRING_CHARS = 1024  # stop sequences, method and profile names, threshold keys
MAX_ECHO_CHARS = 64  # how much of a refused value an error message repeats


def handler_kind(handler: grpc.RpcMethodHandler) -> str:
    """Which of the four behaviour fields an RpcMethodHandler has set ("unary_stream", ...)."""
    return next(kind for kind in KINDS if getattr(handler, kind) is not None)


@dataclass(frozen=True)
class RequestBounds:
    """The largest request (bytes, after decompression) per service; methods of other services get `other`."""

    by_service: dict[str, int]
    other: int = 64 << 10

    def of(self, method: str) -> int:
        service = method.split("/")[1] if method.count("/") == 2 else ""
        return self.by_service.get(service, self.other)


def echo(value: str, limit: int = MAX_ECHO_CHARS) -> str:
    """A client's value as an error or a log line may repeat it: escaped (one line, no control characters) and
    cut to `limit` characters."""
    shown = repr(value[:limit])
    return shown if len(value) <= limit else f"{shown}... ({len(value)} characters)"


def _identifier_problem(value: str) -> str | None:
    if len(value) > MAX_IDENTIFIER_CHARS:
        return f"{len(value)} characters; at most {MAX_IDENTIFIER_CHARS}"
    if not value.isprintable():
        return f"{echo(value)} has control or non-printable characters"
    return None


def _string_problem(name: str, value: str) -> str | None:
    if name in BULK_FIELDS:
        return None
    if name in IDENTIFIER_FIELDS:
        return _identifier_problem(value)
    if len(value) > MAX_OTHER_STRING_CHARS:
        return f"{len(value)} characters; at most {MAX_OTHER_STRING_CHARS}"
    return None


def string_problem(message: Message, prefix: str = "") -> tuple[str, str] | None:
    """(field path, why) for the first string field (nested, repeated and map keys included) out of bounds."""
    for field, value in message.ListFields():
        path = f"{prefix}{field.name}"
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key_type = field.message_type.fields_by_name["key"].type
            for key, item in value.items():
                if key_type == FieldDescriptor.TYPE_STRING and (why := _string_problem("key", key)):
                    return f"{path}[{echo(key, 16)}]", why
                if isinstance(item, Message) and (found := string_problem(item, f"{path}[{echo(str(key), 16)}].")):
                    return found
            continue
        items = value if field.is_repeated else [value]
        for i, item in enumerate(items):
            where = f"{path}[{i}]" if field.is_repeated else path
            if field.type == FieldDescriptor.TYPE_STRING and (why := _string_problem(field.name, item)):
                return where, why
            if field.type == FieldDescriptor.TYPE_MESSAGE and (found := string_problem(item, f"{where}.")):
                return found
    return None


class Refused(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason  # the metric's label


class RequestGuard(grpc.aio.ServerInterceptor):
    def __init__(self, bounds: RequestBounds):
        self.bounds = bounds

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:  # unknown method, or a refusal that reads nothing
            return handler
        return self._guarded(handler, details.method)

    def _parse(self, raw: bytes, method: str, parse, context) -> Message:
        limit = self.bounds.of(method)
        if len(raw) > limit:
            raise Refused("too_large", f"request of {len(raw)} bytes; {method} takes at most {limit}")
        try:
            request = parse(raw)
        except (DecodeError, RuntimeError, ValueError, UnicodeDecodeError) as err:  # upb raises DecodeError
            log.debug("undecodable request to %s from %s: %s", method, context.peer(), type(err).__name__)
            raise Refused("undecodable", f"the request is not a valid {_message_name(parse)}") from None
        if problem := string_problem(request):
            raise Refused("string_bounds", f"{problem[0]}: {problem[1]}")
        return request

    @staticmethod
    async def _refuse(context, refused: Refused) -> None:
        REQUESTS_REJECTED.labels(refused.reason).inc()
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(refused))

    def _guarded(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        kind = handler_kind(handler)
        inner, parse = getattr(handler, kind), handler.request_deserializer

        async def one(raw, context) -> Message:
            try:
                return self._parse(raw, method, parse, context)
            except Refused as refused:
                await self._refuse(context, refused)  # raises AbortError

        async def each(raw_requests, context):
            async for raw in raw_requests:
                yield await one(raw, context)

        async def parsed_stream(raw_requests, context):
            return each(raw_requests, context)

        async def unary_unary(raw, context):
            return await inner(await one(raw, context), context)

        async def stream_unary(raw_requests, context):
            return await inner(each(raw_requests, context), context)

        def relaying(parsed):
            async def streamed(raw, context):
                """The servicer's stream, relayed: the one async generator the guard adds to a stream."""
                result = inner(await parsed(raw, context), context)
                if not hasattr(result, "__aiter__"):  # a method that writes with context.write (health's Watch)
                    await result
                    return
                async with contextlib.aclosing(result):  # a cancelled call closes the servicer's stream at once
                    async for message in result:
                        yield message

            return streamed

        behaviours = {"unary_unary": unary_unary, "unary_stream": relaying(one), "stream_unary": stream_unary,
                      "stream_stream": relaying(parsed_stream)}
        return handler._replace(request_deserializer=None, **{kind: behaviours[kind]})


def _message_name(parse) -> str:
    owner = getattr(parse, "__self__", None)  # FromString is a classmethod of the message class
    descriptor = getattr(owner, "DESCRIPTOR", None)
    return descriptor.full_name if descriptor is not None else "request"
