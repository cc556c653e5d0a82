"""TextGeneration servicer: protobuf in, domain dataclasses to the (cached) engine, protobuf out. Nothing else.

A request goes servicer -> registry -> CachedEngine -> engine: the servicer's own method is the only async
generator above the cache wrapper (errors become statuses through `grpc_status`, not through another wrapper).
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator

import grpc

from prunefusion.server.engines.base import (
    CachePolicy,
    CacheSource,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    InvalidRequestError,
    SamplingParams,
    Timings,
    Usage,
    collect,
)
from prunefusion.server.errors import grpc_status, unary_errors
from prunefusion.server.registry import ModelRegistry
from prunefusion_client.v1 import text_generation_pb2 as pb
from prunefusion_client.v1 import text_generation_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
request_log = logging.getLogger("prunefusion.server.requests")  # INFO only with server.log_requests

FINISH_REASONS = {
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.EOS: pb.FINISH_REASON_EOS,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
    FinishReason.DEADLINE: pb.FINISH_REASON_DEADLINE,
}

CACHE_SOURCES = {
    CacheSource.NONE: pb.CACHE_SOURCE_UNSPECIFIED,
    CacheSource.STORED: pb.CACHE_SOURCE_STORED,
    CacheSource.SHARED: pb.CACHE_SOURCE_SHARED,
}

CACHE_POLICIES = {
    pb.CACHE_POLICY_DEFAULT: CachePolicy.DEFAULT,
    pb.CACHE_POLICY_BYPASS: CachePolicy.BYPASS,
    pb.CACHE_POLICY_REFRESH: CachePolicy.REFRESH,
}


def deadline_of(context: grpc.aio.ServicerContext, now: float | None = None) -> float | None:
    """The call's deadline on the monotonic clock (None: the client set none)."""
    remaining = context.time_remaining()
    return None if remaining is None else (time.monotonic() if now is None else now) + remaining


def to_domain(request: pb.GenerateRequest, default_max_new_tokens: int, context: grpc.aio.ServicerContext,
              stream: bool) -> GenerationRequest:
    if request.cache_policy not in CACHE_POLICIES:
        raise InvalidRequestError("cache_policy", f"unknown value {request.cache_policy}")
    params = SamplingParams(
        max_new_tokens=request.max_new_tokens if request.HasField("max_new_tokens") else default_max_new_tokens,
        temperature=request.temperature if request.HasField("temperature") else 0.0,
        top_p=request.top_p if request.HasField("top_p") else 1.0,
        top_k=request.top_k if request.HasField("top_k") else 0,
        seed=request.seed if request.HasField("seed") else None,
        stop=tuple(request.stop),
    )
    now = time.monotonic()
    return GenerationRequest(request_id=request.request_id or uuid.uuid4().hex, prompt=request.prompt,
                             params=params, arrival=now, deadline=deadline_of(context, now),
                             cache=CACHE_POLICIES[request.cache_policy], stream=stream)


def usage_pb(usage: Usage) -> pb.Usage:
    return pb.Usage(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens)


def timings_pb(t: Timings) -> pb.Timings:
    return pb.Timings(queue_seconds=t.queue_seconds, time_to_first_token_seconds=t.time_to_first_token_seconds,
                      total_seconds=t.total_seconds)


def chunk_pb(chunk: GenerationChunk) -> pb.GenerateStreamChunk:
    message = pb.GenerateStreamChunk(request_id=chunk.request_id, text=chunk.text, token_ids=chunk.token_ids,
                                     cached=chunk.cached, cache_source=CACHE_SOURCES[chunk.cache_source])
    if chunk.finish_reason is not None:
        message.finish_reason = FINISH_REASONS[chunk.finish_reason]
        message.usage.CopyFrom(usage_pb(chunk.usage))
        message.timings.CopyFrom(timings_pb(chunk.timings))
    return message


class TextGenerationServicer(pb_grpc.TextGenerationServicer):
    def __init__(self, registry: ModelRegistry, *, expose_paths: bool = False):
        self._registry = registry
        self._expose_paths = expose_paths  # server.expose_paths: model directories are the server's business

    def _start(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext, stream: bool):
        engine = self._registry.get(request.model)
        domain = to_domain(request, engine.info.default_max_new_tokens, context, stream)
        return engine.info.name, domain, contextlib.aclosing(engine.generate(domain))

    @staticmethod
    async def _end(context: grpc.aio.ServicerContext, model: str, domain: GenerationRequest, reason: FinishReason,
                   usage: Usage, timings: Timings, cached: bool) -> None:
        request_log.info("request %s model=%s finish=%s prompt_tokens=%d completion_tokens=%d ttft=%.1fms total=%.1fms "
                 "cached=%s", domain.request_id, model, reason.value, usage.prompt_tokens, usage.completion_tokens,
                 timings.time_to_first_token_seconds * 1e3, timings.total_seconds * 1e3, cached)
        if reason is FinishReason.DEADLINE:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"deadline passed after {usage.completion_tokens} generated tokens")

    @unary_errors
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        model, domain, stream = self._start(request, context, stream=False)
        async with stream as chunks:
            result = await collect(chunks)
        await self._end(context, model, domain, result.finish_reason, result.usage, result.timings, result.cached)
        return pb.GenerateResponse(
            request_id=result.request_id, model=model, text=result.text, token_ids=result.token_ids,
            finish_reason=FINISH_REASONS[result.finish_reason], usage=usage_pb(result.usage),
            timings=timings_pb(result.timings), cached=result.cached,
            cache_source=CACHE_SOURCES[result.cache_source])

    async def GenerateStream(self, request: pb.GenerateRequest,
                             context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateStreamChunk]:
        async with grpc_status(context):
            model, domain, stream = self._start(request, context, stream=True)
            async with stream as chunks:
                async for chunk in chunks:
                    if chunk.finished:  # log; a DEADLINE finish ends the call with DEADLINE_EXCEEDED instead
                        await self._end(context, model, domain, chunk.finish_reason, chunk.usage, chunk.timings,
                                        chunk.cached)
                    yield chunk_pb(chunk)

    @unary_errors
    async def ListModels(self, request: pb.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[
            pb.ModelInfo(name=i.name, family=i.family, num_layers=i.num_layers, num_parameters=i.num_parameters,
                         weights_digest=i.weights_digest, engine=i.engine, context_length=i.context_length,
                         max_new_tokens_limit=i.max_new_tokens_limit,
                         path=i.path if self._expose_paths else "")
            for i in self._registry.infos()])
