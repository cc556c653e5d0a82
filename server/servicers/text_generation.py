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
    ChatMessage,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    InvalidRequestError,
    SamplingParams,
    Timings,
    Usage,
    collect,
)
from prunefusion.server.engines.fanout import collect_samples, merged, sample_requests
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


# optional request fields -> their default when unset (SamplingParams' own)
OPTIONAL_PARAMS = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": None, "presence_penalty": 0.0,
                   "frequency_penalty": 0.0, "repetition_penalty": 1.0, "min_new_tokens": 0, "logprobs": None}


def prompt_of(request: pb.GenerateRequest, engine) -> str:
    """The prompt text: `prompt`, or `messages` rendered with the model's chat template ("" for token ids)."""
    given = [name for name in ("prompt", "messages", "prompt_token_ids") if getattr(request, name)]
    if len(given) > 1:
        raise InvalidRequestError(given[1], f"give one of prompt, messages and prompt_token_ids, not {given}")
    if request.messages:
        return engine.chat_prompt([ChatMessage(m.role, m.content) for m in request.messages])
    return request.prompt


def to_domain(request: pb.GenerateRequest, engine, context: grpc.aio.ServicerContext,
              stream: bool) -> GenerationRequest:
    if request.cache_policy not in CACHE_POLICIES:
        raise InvalidRequestError("cache_policy", f"unknown value {request.cache_policy}")
    default_max = engine.info.default_max_new_tokens
    params = SamplingParams(
        max_new_tokens=request.max_new_tokens if request.HasField("max_new_tokens") else default_max,
        stop=tuple(request.stop), ignore_eos=request.ignore_eos,
        **{name: getattr(request, name) if request.HasField(name) else default
           for name, default in OPTIONAL_PARAMS.items()})
    now = time.monotonic()
    return GenerationRequest(request_id=request.request_id or uuid.uuid4().hex, prompt=prompt_of(request, engine),
                             params=params, arrival=now, deadline=deadline_of(context, now),
                             cache=CACHE_POLICIES[request.cache_policy], stream=stream,
                             prompt_ids=tuple(request.prompt_token_ids))


def logprobs_pb(logprobs) -> list[pb.TokenLogprob]:
    return [pb.TokenLogprob(token_id=lp.token_id, token=lp.token, logprob=lp.logprob,
                            top=[pb.TopLogprob(token_id=t, token=text, logprob=v) for t, text, v in lp.top])
            for lp in logprobs]


def usage_pb(usage: Usage) -> pb.Usage:
    return pb.Usage(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens)


def timings_pb(t: Timings) -> pb.Timings:
    return pb.Timings(queue_seconds=t.queue_seconds, time_to_first_token_seconds=t.time_to_first_token_seconds,
                      total_seconds=t.total_seconds)


def chunk_pb(chunk: GenerationChunk, request_id: str, index: int) -> pb.GenerateStreamChunk:
    message = pb.GenerateStreamChunk(request_id=request_id, text=chunk.text, token_ids=chunk.token_ids,
                                     cached=chunk.cached, cache_source=CACHE_SOURCES[chunk.cache_source],
                                     logprobs=logprobs_pb(chunk.logprobs), index=index)
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
        """(model name, the request, its stream, n). The stream is the engine's own for one sample (no generator
        added between gRPC and the engine), else the samples' merged stream of (index, chunk)."""
        engine = self._registry.get(request.model)
        domain = to_domain(request, engine, context, stream)
        samples = sample_requests(domain, request.n if request.HasField("n") else 1)
        if len(samples) == 1:
            return engine.info.name, domain, contextlib.aclosing(engine.generate(domain)), 1
        streams = [engine.generate(s) for s in samples]
        return engine.info.name, domain, contextlib.aclosing(merged(streams)), len(samples)

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
        model, domain, stream, n = self._start(request, context, stream=False)
        async with stream as chunks:
            results = [await collect(chunks)] if n == 1 else await collect_samples(chunks)
        for result in results:
            await self._end(context, model, domain, result.finish_reason, result.usage, result.timings, result.cached)
        result = results[0]
        samples = [pb.Sample(index=i, text=r.text, token_ids=r.token_ids, finish_reason=FINISH_REASONS[r.finish_reason],
                             usage=usage_pb(r.usage), logprobs=logprobs_pb(r.logprobs), cached=r.cached)
                   for i, r in enumerate(results)] if len(results) > 1 else []
        return pb.GenerateResponse(
            request_id=domain.request_id, model=model, text=result.text, token_ids=result.token_ids,
            finish_reason=FINISH_REASONS[result.finish_reason], usage=usage_pb(result.usage),
            timings=timings_pb(result.timings), cached=result.cached,
            cache_source=CACHE_SOURCES[result.cache_source], logprobs=logprobs_pb(result.logprobs), samples=samples)

    async def GenerateStream(self, request: pb.GenerateRequest,
                             context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateStreamChunk]:
        async with grpc_status(context):
            model, domain, stream, n = self._start(request, context, stream=True)
            async with stream as chunks:
                async for item in chunks:
                    index, chunk = (0, item) if n == 1 else item
                    if chunk.finished:  # log; a DEADLINE finish ends the call with DEADLINE_EXCEEDED instead
                        await self._end(context, model, domain, chunk.finish_reason, chunk.usage, chunk.timings,
                                        chunk.cached)
                    yield chunk_pb(chunk, domain.request_id, index)

    @unary_errors
    async def ListModels(self, request: pb.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[
            pb.ModelInfo(name=i.name, family=i.family, num_layers=i.num_layers, num_parameters=i.num_parameters,
                         weights_digest=i.weights_digest, engine=i.engine, context_length=i.context_length,
                         max_new_tokens_limit=i.max_new_tokens_limit,
                         path=i.path if self._expose_paths else "")
            for i in self._registry.infos()])
