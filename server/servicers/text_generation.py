"""TextGeneration servicer: protobuf in, domain dataclasses to the engine, protobuf out. Nothing else."""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable

import grpc

from prunefusion.server import metrics
from prunefusion.server.cache.service import CachePolicy, ResponseCache
from prunefusion.server.engines.base import (
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    InvalidRequestError,
    SamplingParams,
    Timings,
    Usage,
    collect,
)
from prunefusion.server.errors import stream_errors, unary_errors
from prunefusion.server.registry import ModelRegistry
from prunefusion_client.v1 import text_generation_pb2 as pb
from prunefusion_client.v1 import text_generation_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

FINISH_REASONS = {
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.EOS: pb.FINISH_REASON_EOS,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
    FinishReason.DEADLINE: pb.FINISH_REASON_DEADLINE,
}


def to_domain(request: pb.GenerateRequest, default_max_new_tokens: int,
              context: grpc.aio.ServicerContext) -> GenerationRequest:
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
                             params=params, arrival=now, deadline=deadline_of(context, now))


def deadline_of(context: grpc.aio.ServicerContext, now: float | None = None) -> float | None:
    """The call's deadline on the monotonic clock (None: the client set none)."""
    remaining = context.time_remaining()
    return None if remaining is None else (time.monotonic() if now is None else now) + remaining


def usage_pb(usage: Usage) -> pb.Usage:
    return pb.Usage(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens)


def timings_pb(t: Timings) -> pb.Timings:
    return pb.Timings(queue_seconds=t.queue_seconds, time_to_first_token_seconds=t.time_to_first_token_seconds,
                      total_seconds=t.total_seconds)


def chunk_pb(chunk: GenerationChunk, cached: bool = False) -> pb.GenerateStreamChunk:
    message = pb.GenerateStreamChunk(request_id=chunk.request_id, text=chunk.text, token_ids=chunk.token_ids,
                                     cached=cached)
    if chunk.finish_reason is not None:
        message.finish_reason = FINISH_REASONS[chunk.finish_reason]
        message.usage.CopyFrom(usage_pb(chunk.usage))
        message.timings.CopyFrom(timings_pb(chunk.timings))
    return message


CACHE_POLICIES = {
    pb.CACHE_POLICY_DEFAULT: CachePolicy.DEFAULT,
    pb.CACHE_POLICY_BYPASS: CachePolicy.BYPASS,
    pb.CACHE_POLICY_REFRESH: CachePolicy.REFRESH,
}


async def observed(model: str, items: AsyncIterator[tuple[GenerationChunk, bool]]
                   ) -> AsyncIterator[tuple[GenerationChunk, bool]]:
    """Record latency metrics of model runs (cache replays are not model latency)."""
    last = None
    async with contextlib.aclosing(items):
        async for chunk, cached in items:
            now = time.monotonic()
            if not cached and last is not None:
                metrics.INTER_TOKEN_LATENCY.labels(model).observe(now - last)
            last = now
            if chunk.finished and not cached:
                metrics.TIME_TO_FIRST_TOKEN.labels(model).observe(chunk.timings.time_to_first_token_seconds)
                metrics.E2E_LATENCY.labels(model).observe(chunk.timings.total_seconds)
                metrics.QUEUE_TIME.labels(model).observe(chunk.timings.queue_seconds)
            yield chunk, cached


class TextGenerationServicer(pb_grpc.TextGenerationServicer):
    def __init__(self, registry: ModelRegistry, cache: Callable[[], ResponseCache]):
        self._registry = registry
        self._cache = cache  # read per call: the server opens the cache after it starts listening

    def _start(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext, whole: bool):
        engine = self._registry.get(request.model)
        domain = to_domain(request, engine.info.default_max_new_tokens, context)
        if request.cache_policy not in CACHE_POLICIES:
            raise InvalidRequestError("cache_policy", f"unknown value {request.cache_policy}")
        items = self._cache().generate(engine, domain, CACHE_POLICIES[request.cache_policy], whole=whole)
        return engine, domain, contextlib.aclosing(observed(engine.info.name, items))

    @staticmethod
    async def _end(context: grpc.aio.ServicerContext, engine, domain: GenerationRequest, reason: FinishReason,
                   usage: Usage, timings: Timings, cached: bool) -> None:
        log.info("request %s model=%s finish=%s prompt_tokens=%d completion_tokens=%d ttft=%.1fms total=%.1fms "
                 "cached=%s", domain.request_id, engine.info.name, reason.value, usage.prompt_tokens,
                 usage.completion_tokens, timings.time_to_first_token_seconds * 1e3, timings.total_seconds * 1e3,
                 cached)
        if reason is FinishReason.DEADLINE:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"deadline passed after {usage.completion_tokens} generated tokens")

    @unary_errors
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        engine, domain, stream = self._start(request, context, whole=True)
        cached = False
        async with stream as items:

            async def chunks():
                nonlocal cached
                async for chunk, from_cache in items:
                    cached = from_cache
                    yield chunk

            result = await collect(chunks())
        await self._end(context, engine, domain, result.finish_reason, result.usage, result.timings, cached)
        return pb.GenerateResponse(
            request_id=result.request_id, model=engine.info.name, text=result.text, token_ids=result.token_ids,
            finish_reason=FINISH_REASONS[result.finish_reason], usage=usage_pb(result.usage),
            timings=timings_pb(result.timings), cached=cached)

    @stream_errors
    async def GenerateStream(self, request: pb.GenerateRequest,
                             context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateStreamChunk]:
        engine, domain, stream = self._start(request, context, whole=False)
        async with stream as items:
            async for chunk, cached in items:
                if chunk.finished:  # log; a DEADLINE finish ends the call with DEADLINE_EXCEEDED instead
                    await self._end(context, engine, domain, chunk.finish_reason, chunk.usage, chunk.timings, cached)
                yield chunk_pb(chunk, cached)

    @unary_errors
    async def ListModels(self, request: pb.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[
            pb.ModelInfo(name=i.name, family=i.family, num_layers=i.num_layers, num_parameters=i.num_parameters,
                         weights_digest=i.weights_digest, engine=i.engine, context_length=i.context_length,
                         max_new_tokens_limit=i.max_new_tokens_limit, path=i.path)
            for i in self._registry.infos()])
