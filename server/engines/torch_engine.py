"""A continuous-batching engine on plain PyTorch + transformers (CPU or GPU).

One asyncio task schedules; one worker thread runs the model. Between decode steps, finished, cancelled and
expired rows leave the batch and queued requests join it. Two decode paths (`decode_path`, chosen at start):
- "slots" (slot_kv.py, the Llama family): the batch's KV cache in preallocated slots. A newcomer's prompt is
  prefilled into the slot after the decoding rows, at most `prefill_chunk_tokens` per step after the step's decode
  (chunked prefill: a long prompt does not stall the running streams), starting from the prompt's cached prefix
  blocks when the prefix cache has them (prefix_cache.py); it joins the decode when its prefill is done.
- "transformers" (kv_batch.py, every other family, and `fast_decode: false`): each newcomer prefilled alone in one
  step by transformers' forward, then merged into the left-padded batch KV cache.
The batch (`_active`, `_prefilling`, `_kv`) is touched only inside `_step` (worker thread) or while no step is
running; the admission queue only on the event loop. Admission, the EOS / stop / length rule,
finish counters, timings and metrics are the request book's (book.py), shared with the vLLM engine.

Determinism: greedy requests, and sampled requests with a seed, draw nothing from shared state: every request owns
its `torch.Generator` and draws one number per step. What batch partners can change is the padding width of the
KV cache, which can perturb logits in the last floating-point bits (measured here: equal tokens in the tests); a
near-tie between two tokens can therefore resolve differently when partners change. Batch-of-one runs are bitwise
repeatable on the same machine and library versions.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from prunefusion.server.config import TorchModelConfig
from prunefusion.server.engines.base import EngineStats, FinishReason, GenerationChunk, GenerationRequest
from prunefusion.server.engines.book import BookedEngine, TextRequest
from prunefusion.server.engines.compute_thread import ComputeThread
from prunefusion.server.engines.hf_loading import LoadedModel, load_causal_lm
from prunefusion.server.engines.kv_batch import BatchedKV
from prunefusion.server.engines.prefix_cache import PrefixCache
from prunefusion.server.engines.sampling import apply_penalties, select_tokens, token_logprobs
from prunefusion.server.engines.slot_kv import SlotKV, refusal
from prunefusion.server.metrics import BATCH_SIZE, PROMPT_TOKENS

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Sequence(TextRequest):
    generator: torch.Generator | None = None  # the request's own, seeded at admission
    outbox: asyncio.Queue = field(default_factory=asyncio.Queue)  # GenerationChunk | BaseException
    cancel_requested: bool = False  # set from the event loop; honoured at the next step


class TorchEngine(BookedEngine):
    kind = "torch"

    def __init__(self, cfg: TorchModelConfig):
        super().__init__(cfg)
        self._loaded: LoadedModel | None = None
        self._compute = ComputeThread(f"engine-{cfg.name}")
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._active: list[_Sequence] = []
        self._prefilling: collections.deque[_Sequence] = collections.deque()  # admitted, prompt not all prefilled
        self._kv: BatchedKV | SlotKV = BatchedKV()
        self.prefix_cache: PrefixCache | None = None  # slot path with prefix_cache_tokens > 0
        self.decode_path = "transformers"  # or "slots" (slot_kv.py), chosen at start
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._accepting = False
        self.steps = 0  # decode steps run
        self.prefill_passes = 0  # forward passes over prompt tokens (a chunk each on the slot path)
        self.peak_batch = 0  # most rows decoded together in one step
        self.compile_seconds: float | None = None  # start-up compile of the slot decode step, when it ran
        self._eos_ids: frozenset[int] = frozenset()

    # ---- lifecycle -------------------------------------------------------------------------------------------
    async def start(self) -> None:
        c = self.cfg
        self._loaded = await self._compute.run(lambda: load_causal_lm(
            c.resolved_path, device=c.device, dtype=c.dtype, trust_remote_code=c.trust_remote_code,
            context_length=c.context_length))
        self.open_book(self._loaded, device=torch.device(c.device).type)
        self._eos_ids = frozenset(self._loaded.eos_token_ids)
        await self._compute.run(self._choose_decode_path)  # on the model thread: see _choose_decode_path
        await self._compute.run(self._warm_up)
        self._loop_task = asyncio.create_task(self._run(), name=f"engine-loop-{self.name}")
        self._accepting = True

    async def shutdown(self) -> None:
        self._accepting = False
        for seq in self.book.in_flight() if self.book else []:
            seq.cancel_requested = True
        self._wake.set()
        if self._loop_task is not None:
            await self._loop_task
        await self._compute.shutdown()

    def stats(self) -> EngineStats:
        healthy = self._accepting and self._loop_task is not None and not self._loop_task.done()
        return EngineStats(running=len(self._active) + len(self._prefilling), waiting=len(self._waiting),
                           healthy=healthy)

    # ---- requests --------------------------------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        prompt_ids = await self.book.encode(request, self.healthy)
        seed = request.params.seed if request.params.seed is not None else secrets.randbits(63)
        seq = self.book.admit(_Sequence, request, prompt_ids, generator=torch.Generator().manual_seed(seed))
        self._waiting.append(seq)
        self._wake.set()
        try:
            while True:
                item = await seq.outbox.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            if not seq.done:
                self._cancel(seq)

    def _cancel(self, seq: _Sequence) -> None:
        if seq in self._waiting:  # never started: answer at once, no step needed
            self._waiting.remove(seq)
            seq.outbox.put_nowait(self.book.finish(seq, FinishReason.CANCELLED))
        else:
            seq.cancel_requested = True
            self._wake.set()

    # ---- scheduling loop (event loop side) ---------------------------------------------------------------------
    async def _run(self) -> None:
        while self._accepting or self._active or self._prefilling or self._waiting:
            if not self._active and not self._prefilling and not self._waiting:
                self._wake.clear()
                await self._wake.wait()
                continue
            newcomers = []
            while self._waiting and len(self._active) + len(self._prefilling) + len(newcomers) < \
                    self.cfg.max_batch_size:
                newcomers.append(self._waiting.popleft())
            outputs = await self._compute.run(self._step, newcomers)
            for seq, item in outputs:
                seq.outbox.put_nowait(item)
            self.book.publish(self.stats())

    # ---- model side (worker thread) ----------------------------------------------------------------------------
    def _attention_kernels(self) -> contextlib.AbstractContextManager:
        """On CUDA, keep SDPA off cuDNN: with the batch cache's growing, padded shapes it rebuilt a kernel plan at
        every step (measured on an H100, bf16: 46 ms per decode step vs 6.5-8 ms without cuDNN; gpu_check.py)."""
        if not self.cfg.device.startswith("cuda"):
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])

    def _step(self, newcomers: list[_Sequence]) -> list[tuple[_Sequence, GenerationChunk | BaseException]]:
        """One scheduling step. A model failure fails the requests still running, not the engine, and never
        loses the chunks of requests that finished earlier in the same step."""
        out: list[tuple[_Sequence, GenerationChunk | BaseException]] = []
        try:
            with self._attention_kernels():
                self._step_rows(newcomers, out)
        except Exception as exc:
            failed = [seq for seq in dict.fromkeys([*self._active, *self._prefilling, *newcomers]) if not seq.done]
            log.exception("engine %s: step failed; failing %d requests", self.name, len(failed))
            for seq in failed:
                self.book.drop(seq)
                out.append((seq, exc))
            self._active = []
            self._prefilling.clear()
            self._kv.keep([])  # empty: a half-written step's keys lie past every row's length or are dropped
            if isinstance(self._kv, SlotKV):
                self._kv.unstage()
        return out

    def _step_rows(self, newcomers: list[_Sequence], out: list) -> None:
        now = time.monotonic()
        for seq in self._active:
            if reason := self._stop_reason(seq, now):
                out.append((seq, self.book.finish(seq, reason, seq.text.finish())))
        self._drop_done()
        self._prefilling.extend(newcomers)
        for i, seq in reversed(list(enumerate(self._prefilling))):  # ended while its prompt waited: never runs
            if reason := self._stop_reason(seq, now):
                del self._prefilling[i]
                if i == 0 and isinstance(self._kv, SlotKV):
                    self._kv.unstage()  # only the first waiting prompt is ever staged
                out.append((seq, self.book.finish(seq, reason)))
        budget = (self.cfg.prefill_chunk_tokens or float("inf")) if self.decode_path == "slots" else float("inf")
        with torch.inference_mode():
            # running rows advance first; prompts are prefilled after (on the slot path the first waiting prompt's
            # next chunk rides in the decode's forward pass), so a newcomer's first token goes out with this step's
            # results instead of waiting for another decode step
            if self._active:
                budget -= self._decode(out, budget)
                self._drop_done()
            self._advance_prefills(out, budget)
            self._drop_done()

    def _advance_prefills(self, out: list, budget: float) -> None:
        """Prefill waiting prompts in order, within `budget` prompt tokens (the slot path's chunk size, less what
        rode with the decode; whole prompts on the transformers path), appending each first token to `out` as it
        comes (a later failure in the step keeps it)."""
        while self._prefilling and budget > 0:
            if self.decode_path != "slots":
                out.append((self._prefilling[0], self._prefill(self._prefilling[0])))
                self._prefilling.popleft()
                continue
            ids = self._next_slot_chunk(budget)
            budget -= ids.shape[1]
            self._after_slot_chunk(self._kv.extend_logits(self._loaded.model, ids), ids.shape[1], out)

    def _next_slot_chunk(self, budget: float) -> torch.Tensor:
        """The first waiting prompt's next at most `budget` tokens [1, T], staging it first (from its cached prefix
        blocks) if it is not staged yet."""
        assert isinstance(self._kv, SlotKV)
        seq = self._prefilling[0]
        if self._kv.staged is None:
            seq.started = time.monotonic()
            self._kv.stage(self.prefix_cache.lookup(seq.prompt_ids) if self.prefix_cache else [])
            PROMPT_TOKENS.labels(self.name, "prefix_cache").inc(self._kv.staged)
        start = self._kv.staged
        return torch.tensor([seq.prompt_ids[start:int(min(len(seq.prompt_ids), start + budget))]],
                            device=self.cfg.device)

    def _after_slot_chunk(self, logits: torch.Tensor, tokens: int, out: list) -> None:
        """After a chunk of the first waiting prompt went in: when the prompt is all in, cache its blocks, pick its
        first token and let it join the decode (or leave, if that token ended it)."""
        assert isinstance(self._kv, SlotKV)
        seq = self._prefilling[0]
        PROMPT_TOKENS.labels(self.name, "computed").inc(tokens)
        self.prefill_passes += 1
        if self._kv.staged < len(seq.prompt_ids):
            return
        if self.prefix_cache:
            self.prefix_cache.store(seq.prompt_ids, self._kv.staged_block)
        chosen, logprobs = self._select(logits, [seq])
        out.append((seq, self.book.tokens(seq, chosen, logprobs=logprobs)))
        self._prefilling.popleft()
        if seq.done:  # a row that ended on its first token never joins the decode
            self._kv.unstage()
        else:
            self._kv.commit()
            self._active.append(seq)

    @staticmethod
    def _stop_reason(seq: _Sequence, now: float) -> FinishReason | None:
        """Why a row must leave before the next step, if it must. A front end's deadline also cancels the call,
        so expiry is checked first to report it as DEADLINE."""
        if seq.expired(now):
            return FinishReason.DEADLINE
        return FinishReason.CANCELLED if seq.cancel_requested else None

    def _prefill(self, seq: _Sequence) -> GenerationChunk:
        assert self._loaded is not None
        seq.started = time.monotonic()
        cache = DynamicCache()  # full-length layers for every model, so rows can be merged (see kv_batch.py)
        ids = torch.tensor([seq.prompt_ids], device=self.cfg.device)
        logits = self._loaded.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        tokens, logprobs = self._select(logits[:, -1], [seq])
        chunk = self.book.tokens(seq, tokens, logprobs=logprobs)
        if not seq.done:  # a row that ended on its first token never joins the batch cache
            self._kv.join(cache, len(seq.prompt_ids))
            self._active.append(seq)
        return chunk

    def _decode(self, out: list, budget: float) -> int:
        """One decode step of every running row, with the first waiting prompt's next chunk (at most `budget`
        tokens) in the same forward pass on the slot path; returns the prompt tokens it took."""
        assert self._loaded is not None
        rows = list(self._active)
        input_ids = torch.tensor([[seq.output_ids[-1]] for seq in rows], device=self.cfg.device)
        ride = self._next_slot_chunk(budget) if self.decode_path == "slots" and self._prefilling and budget else None
        if ride is None:
            logits = self._kv.decode_logits(self._loaded.model, input_ids)  # [B, V]
        else:
            logits, ride_logits = self._kv.decode_and_extend_logits(self._loaded.model, input_ids, ride)
        self.steps += 1
        self.peak_batch = max(self.peak_batch, len(rows))
        BATCH_SIZE.labels(self.name).observe(len(rows))
        tokens, logprobs = self._select(logits, rows)
        out.extend((seq, self.book.tokens(seq, [tok], logprobs=[lp])) for seq, tok, lp in zip(rows, tokens, logprobs,
                                                                                               strict=True))
        if ride is None:
            return 0
        self._after_slot_chunk(ride_logits, ride.shape[1], out)
        return ride.shape[1]

    def _select(self, logits: torch.Tensor, rows: list[_Sequence]) -> tuple[list[int], list]:
        """Each row's next token (penalties, then sampling) and, for rows that asked, its logprobs."""
        params = [s.request.params for s in rows]
        adjusted = apply_penalties(logits, params, [(s.prompt_ids, s.output_ids) for s in rows], self._eos_ids)
        tokens = select_tokens(adjusted, params, [s.generator for s in rows])
        return tokens, token_logprobs(logits, tokens, [p.logprobs for p in params])

    def _drop_done(self) -> None:
        keep = [i for i, seq in enumerate(self._active) if not seq.done]
        if len(keep) != len(self._active):
            self._kv.keep(keep)
            self._active = [self._active[i] for i in keep]

    def _choose_decode_path(self) -> None:
        """Slots when the config asks for them and the family has a slot step; else transformers' forward."""
        assert self._loaded is not None
        why = "fast_decode: false" if not self.cfg.fast_decode else refusal(self._loaded.model,
                                                                             self._loaded.context_length)
        self.decode_path = "transformers" if why else "slots"
        if why:
            log.info("engine %s: decode on transformers' forward (%s)", self.name, why)
            return
        self._kv = SlotKV(self._loaded.model, self.cfg.max_batch_size, self._loaded.context_length)
        if self.cfg.prefix_cache_tokens:
            self.prefix_cache = PrefixCache(self.cfg.prefix_cache_tokens)
        log.info("engine %s: decode on KV slots, %d rows x %d positions, %.1f MiB; prefill chunk %s tokens; "
                 "prefix cache up to %d tokens (%.1f MiB)", self.name, self.cfg.max_batch_size,
                 self._loaded.context_length, self._kv.nbytes / 2**20, self.cfg.prefill_chunk_tokens or "whole",
                 self.cfg.prefix_cache_tokens, self._kv.bytes_per_token * self.cfg.prefix_cache_tokens / 2**20)

    def _warm_up(self) -> None:
        assert self._loaded is not None
        with torch.inference_mode(), self._attention_kernels():
            ids = torch.tensor([self.book.prompts.encode_now("Hello")], device=self.cfg.device)
            cache = DynamicCache()
            self._loaded.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            if isinstance(self._kv, SlotKV) and self.cfg.compile_decode:
                self._compile_decode()

    def _compile_decode(self) -> None:
        """Compile the slot decode step now, not on the first requests; if compiling fails (no C++ compiler for
        inductor, an unsupported op), say so and decode eager: same outputs, slower."""
        sizes = sorted({1, min(2, self.cfg.max_batch_size), self.cfg.max_batch_size})
        try:
            self.compile_seconds = self._kv.compile(self._loaded.model, sizes)
        except Exception:
            log.exception("engine %s: compiling the decode step failed; decoding eager", self.name)
            return
        log.info("engine %s: decode step compiled in %.1f s (batch sizes %s warmed; compile_decode: false skips "
                 "it)", self.name, self.compile_seconds, sizes)
