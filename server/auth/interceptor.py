"""One server interceptor for every RPC, unary and streaming: API keys, per-key quotas and model allow-lists, and
the access log.

Order of checks: the key (from metadata, before the request is even parsed) -> the key's request rate -> (once the
request is parsed) its model allow-list and concurrency. Refusals never say more than the status needs: a missing
and a wrong key get the same UNAUTHENTICATED message, and no key material reaches logs, metrics or errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from prunefusion.server.auth.keys import ApiKey, KeyStore, TokenBucket, bucket_size
from prunefusion.server.auth.tls import peer_identity
from prunefusion.server.guard import handler_kind
from prunefusion.server.metrics import API_REQUESTS

log = logging.getLogger(__name__)
access_log = logging.getLogger("prunefusion.server.access")

HEALTH_SERVICE = "grpc.health.v1.Health"
REFLECTION_SERVICES = ("grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection")
UNAUTHENTICATED = "missing or invalid API key (metadata 'authorization: Bearer KEY')"
HTTP_UNAUTHENTICATED = "missing or invalid API key (header 'Authorization: Bearer KEY')"
ANONYMOUS = "-"
CANCELLATIONS = (asyncio.CancelledError, GeneratorExit)


class Refusal(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.code, self.retry_after_s = code, retry_after_s


def bearer_token(values: list) -> str | None:
    """The key in exactly one `authorization: Bearer KEY` value (scheme case-insensitive, RFC 7235), else None."""
    if len(values) != 1 or not isinstance(values[0], str):
        return None
    scheme, _, token = values[0].partition(" ")
    return token if scheme.lower() == "bearer" and token else None


@dataclass
class _KeyState:
    """One per key name for the server's lifetime: calls in flight hold it, so a reload updates it in place."""

    key: ApiKey
    bucket: TokenBucket | None
    in_flight: int = 0


def _status(context: grpc.aio.ServicerContext, error: BaseException | None) -> str:
    code = context.code()
    if code is None:
        # the client went away (a cancelled call, a stream closed early) even if the servicer then ended normally
        if context.cancelled() or isinstance(error, CANCELLATIONS):
            code = grpc.StatusCode.CANCELLED
        else:
            code = grpc.StatusCode.OK if error is None else grpc.StatusCode.UNKNOWN
    return code.name if isinstance(code, grpc.StatusCode) else str(code)


class AccessControl(grpc.aio.ServerInterceptor):
    """`keys` None: no authentication (the interceptor then only writes the access log).

    A key's model allow-list applies to the calls whose request names a model (TextGeneration, Multimodal);
    ListModels and QualityFilter carry none and are open to every valid key."""

    def __init__(self, keys: KeyStore | None, *, model_of: Callable[[str, str], str],
                 reflection_requires_key: bool = True, access_log_on: bool = False,
                 clock: Callable[[], float] = time.monotonic):
        self._model_of = model_of  # (service, requested name) -> the model the call will use
        self._open = {HEALTH_SERVICE, *(() if reflection_requires_key else REFLECTION_SERVICES)}
        self._access_log = access_log_on
        self._clock = clock
        self._states: dict[str, _KeyState] = {}
        self.keys = None
        self.replace_keys(keys)

    def _bucket(self, key: ApiKey) -> TokenBucket | None:
        size = bucket_size(key.limits)
        return None if size is None else TokenBucket(key.limits.requests_per_second, size, self._clock())

    def replace_keys(self, keys: KeyStore | None) -> None:
        """Swap the key store (a reload). A key's state is updated in place: calls in flight keep counting against
        it, and its bucket is kept unless its limits changed."""
        for key in keys.keys if keys else ():
            state = self._states.get(key.name)
            if state is None:
                self._states[key.name] = _KeyState(key, self._bucket(key))
            else:
                if state.key.limits != key.limits:
                    state.bucket = self._bucket(key)
                state.key = key
        self.keys = keys

    def authenticate(self, authorization: list) -> ApiKey | None:
        """The key named by the `authorization` values (metadata entries, or an HTTP header), or None."""
        token = bearer_token(authorization)
        return None if token is None or self.keys is None else self.keys.match(token)

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None:  # unknown method: UNIMPLEMENTED, as without the interceptor
            return None
        service = details.method.split("/")[1] if details.method.count("/") == 2 else ""
        if self.keys is None or service in self._open:
            return self._wrap(handler, details.method, service, None) if self._access_log else handler
        key = self.authenticate([m.value for m in details.invocation_metadata or () if m.key == "authorization"])
        if key is None:
            API_REQUESTS.labels(key=ANONYMOUS, result="unauthenticated").inc()
            return self._refuse(handler, details.method, Refusal(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED))
        state = self._states[key.name]
        wait = 0.0 if state.bucket is None else state.bucket.take(self._clock())
        if wait > 0:
            API_REQUESTS.labels(key=key.name, result="rate_limited").inc()
            return self._refuse(handler, details.method, Refusal(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"key {key.name!r} is over its {key.limits.requests_per_second:g} requests/s; retry in {wait:.2f} s",
                retry_after_s=wait), key.name)
        return self._wrap(handler, details.method, service, state)

    def _admit(self, state: _KeyState | None, service: str, request) -> None:
        """The parsed request's checks: the key's model allow-list and its concurrency."""
        if state is None:
            return
        names_model = "model" in getattr(getattr(request, "DESCRIPTOR", None), "fields_by_name", ())
        self._admit_for(state, service, request.model if names_model else None)

    @contextlib.contextmanager
    def http_call(self, authorization: list, service: str, model: str | None):
        """An HTTP request's checks, in the gRPC order (key, rate, then the model allow-list and concurrency), held
        while the response is sent; raises Refusal. `model` None: the route names none (open to every key)."""
        if self.keys is None:
            yield ANONYMOUS
            return
        key = self.authenticate(authorization)
        if key is None:
            API_REQUESTS.labels(key=ANONYMOUS, result="unauthenticated").inc()
            raise Refusal(grpc.StatusCode.UNAUTHENTICATED, HTTP_UNAUTHENTICATED)
        state = self._states[key.name]
        wait = 0.0 if state.bucket is None else state.bucket.take(self._clock())
        if wait > 0:
            API_REQUESTS.labels(key=key.name, result="rate_limited").inc()
            raise Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, f"key {key.name!r} is over its "
                          f"{key.limits.requests_per_second:g} requests/s; retry in {wait:.2f} s", retry_after_s=wait)
        self._admit_for(state, service, model)
        try:
            yield key.name
        finally:
            state.in_flight -= 1

    def _admit_for(self, state: _KeyState, service: str, requested: str | None) -> None:
        key = state.key
        if key.models is not None and requested is not None:
            model = self._model_of(service, requested)
            if model not in key.models:
                API_REQUESTS.labels(key=key.name, result="permission_denied").inc()
                raise Refusal(grpc.StatusCode.PERMISSION_DENIED,
                              f"key {key.name!r} may not use model {model[:64]!r}; it may use {sorted(key.models)}")
        limit = key.limits.max_concurrent
        if limit is not None and state.in_flight >= limit:
            API_REQUESTS.labels(key=key.name, result="concurrency_limited").inc()
            raise Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"key {key.name!r} already has {limit} calls in flight (its limit); retry when one ends",
                          retry_after_s=0.1)
        API_REQUESTS.labels(key=key.name, result="ok").inc()
        state.in_flight += 1

    @staticmethod
    async def _abort(context: grpc.aio.ServicerContext, refusal: Refusal) -> None:
        """Ends the call with the refusal's status (context.abort always raises)."""
        if refusal.retry_after_s is not None:
            context.set_trailing_metadata((("grpc-retry-pushback-ms", str(int(refusal.retry_after_s * 1000))),))
        await context.abort(refusal.code, str(refusal))

    def _caller(self, context) -> tuple[str, str] | None:
        """(peer, client certificate) while the call is live: asked once the call has ended, grpc's C core may
        already have freed it (a segfault seen in CI on a cancelled stream)."""
        return (context.peer(), peer_identity(context)) if self._access_log else None

    def _log(self, method: str, key_name: str, context, error, started: float, caller: tuple[str, str] | None) -> None:
        if self._access_log and caller is not None:
            access_log.info("%s key=%s peer=%s client_cert=%s status=%s %.1fms", method, key_name, *caller,
                            _status(context, error), (time.perf_counter() - started) * 1e3)

    def _refuse(self, handler: grpc.RpcMethodHandler, method: str, refusal: Refusal,
                key_name: str = ANONYMOUS) -> grpc.RpcMethodHandler:
        """A handler of the same kind that answers `refusal` without parsing the request."""
        kind = handler_kind(handler)

        async def unary(request, context):
            started, caller = time.perf_counter(), self._caller(context)
            try:
                await self._abort(context, refusal)
            finally:
                self._log(method, key_name, context, refusal, started, caller)

        async def stream(request, context):
            await unary(request, context)
            yield  # pragma: no cover - abort raised above

        return handler._replace(request_deserializer=None, **{kind: stream if kind.endswith("stream") else unary})

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str, service: str,
              state: _KeyState | None) -> grpc.RpcMethodHandler:
        kind = handler_kind(handler)
        inner = getattr(handler, kind)
        unary_request = kind.startswith("unary")

        @contextlib.asynccontextmanager
        async def admitted(request, context):
            """Around the servicer: the parsed request's checks, the in-flight count, the access-log line."""
            started, error, counted, caller = time.perf_counter(), None, False, self._caller(context)
            try:
                self._admit(state, service, request if unary_request else None)
                counted = state is not None
                yield
            except Refusal as refusal:
                error = refusal
                await self._abort(context, refusal)
            except BaseException as exc:
                error = exc
                raise
            finally:
                if counted:
                    state.in_flight -= 1
                self._log(method, state.key.name if state else ANONYMOUS, context, error, started, caller)

        async def unary(request, context):
            async with admitted(request, context):
                return await inner(request, context)

        async def stream(request, context):
            async with admitted(request, context):
                result = inner(request, context)
                if not hasattr(result, "__aiter__"):  # a method that writes with context.write (grpc.health's Watch)
                    await result
                    return
                async with contextlib.aclosing(result):  # a cancelled call closes the servicer's stream at once
                    async for message in result:
                        yield message

        return handler._replace(**{kind: stream if kind.endswith("stream") else unary})
