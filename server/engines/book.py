"""The request book every text engine keeps: prompt checks and encoding, admission, per-token accounting, finishing.

The torch and vLLM engines differ in how they run the model; what a request goes through around it is the same
and lives here: the healthy check before and after encoding (a long prompt is tokenized off the event loop), the
duplicate-id check, the capacity bound (running + waiting <= max_batch_size + max_queue, counted over every request
in flight, so nothing is admitted past it while a step runs), the EOS / stop / length rule (`IncrementalText.accept`),
finish counters, timings and the Prometheus metrics (so every front end gets them, and cache replays never count).

Thread safety: entries are added on the event loop and may be finished on an engine's worker thread; the id table
and the counters are guarded by one lock.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from prunefusion.server.engines.base import (
    Engine,
    EngineStats,
    EngineUnavailableError,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    InvalidRequestError,
    QueueFullError,
    Timings,
    TokenLogprob,
    Usage,
)
from prunefusion.server.engines.chat import ChatMessage, render_chat, template_of
from prunefusion.server.engines.prompts import PromptEncoder
from prunefusion.server.engines.text import IncrementalText
from prunefusion.server.metrics import (
    E2E_LATENCY,
    FINISHED,
    INTER_TOKEN_LATENCY,
    MODEL_RUNS,
    QUEUE_TIME,
    REQUESTS_RUNNING,
    REQUESTS_WAITING,
    TIME_TO_FIRST_TOKEN,
)


@dataclass(eq=False)
class TextRequest:
    """One admitted request, as every text engine tracks it. Engines subclass it for their own state."""

    request: GenerationRequest
    prompt_ids: list[int]
    text: IncrementalText
    output_ids: list[int] = field(default_factory=list)
    started: float | None = None  # the engine began working on it (prefill); None while it waits
    first_token_at: float | None = None
    last_chunk_at: float | None = None
    counted: bool = True  # in the metrics and finish counters (False: an engine's own warm-up request)
    done: bool = False

    @property
    def request_id(self) -> str:
        return self.request.request_id

    def expired(self, now: float) -> bool:
        return self.request.deadline is not None and now >= self.request.deadline


Entry = TypeVar("Entry", bound=TextRequest)


class RequestBook:
    def __init__(self, model: str, checkpoint, *, max_running: int, max_queue: int, max_new_tokens_limit: int):
        """`checkpoint`: hf_loading.Checkpoint (tokenizer, EOS ids, context length)."""
        self.model = model
        self.max_queue = max_queue
        self.capacity = max_running + max_queue
        self.prompts = PromptEncoder(checkpoint.tokenizer, context_length=checkpoint.context_length,
                                     max_token_chars=checkpoint.max_token_chars,
                                     max_new_tokens_limit=max_new_tokens_limit)
        self._tokenizer = checkpoint.tokenizer
        self._eos = checkpoint.eos_token_ids
        self._entries: dict[str, TextRequest] = {}
        self._lock = threading.Lock()
        self.finished: collections.Counter[FinishReason] = collections.Counter()
        # this model's metric series, looked up once: the inter-token one is observed for every chunk
        self._runs, self._itl = MODEL_RUNS.labels(model), INTER_TOKEN_LATENCY.labels(model)
        self._ttft, self._e2e, self._queue = (m.labels(model) for m in (TIME_TO_FIRST_TOKEN, E2E_LATENCY, QUEUE_TIME))
        self._running, self._waiting = REQUESTS_RUNNING.labels(model), REQUESTS_WAITING.labels(model)

    @property
    def tokenizer(self):
        return self._tokenizer

    # ---- admission --------------------------------------------------------------------------------------------
    def check_open(self, healthy: bool) -> None:
        if not healthy:
            raise EngineUnavailableError(f"model {self.model!r} is not accepting requests")

    async def encode(self, request: GenerationRequest, healthy: Callable[[], bool]) -> list[int]:
        """Every check and the prompt's token ids; the engine must still be open after a (threaded) tokenization."""
        self.check_open(healthy())
        prompt_ids = await self.prompts.encode(request)
        self.check_open(healthy())  # it may have stopped while a long prompt was tokenized
        return prompt_ids

    def admit(self, kind: type[Entry], request: GenerationRequest, prompt_ids: list[int], **state) -> Entry:
        """Take a place for an encoded request, or refuse it (duplicate id, capacity)."""
        params = request.params
        entry = kind(request=request, prompt_ids=prompt_ids, text=IncrementalText(
            self._tokenizer, prompt_ids, params.stop, eos_token_ids=frozenset() if params.ignore_eos else self._eos,
            max_new_tokens=params.max_new_tokens, min_new_tokens=params.min_new_tokens), **state)
        with self._lock:
            if request.request_id in self._entries:
                raise InvalidRequestError("request_id", f"{request.request_id!r} is already in flight")
            if len(self._entries) >= self.capacity:
                raise QueueFullError(f"model {self.model!r}: admission queue full ({self.max_queue} waiting)",
                                     retry_after_s=1.0)
            self._entries[request.request_id] = entry
        if entry.counted:
            self._runs.inc()
        return entry

    def get(self, request_id: str) -> TextRequest | None:
        return self._entries.get(request_id)

    def in_flight(self) -> list[TextRequest]:
        with self._lock:
            return list(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    # ---- outputs ----------------------------------------------------------------------------------------------
    def tokens(self, entry: TextRequest, token_ids: list[int], *, then: FinishReason | None = None,
               logprobs: Sequence[tuple[float, list[tuple[int, float]]] | None] = ()) -> GenerationChunk | None:
        """Record sampled tokens; their chunk, final when the request ends within them, or after them with `then`
        (an engine that learned from its backend that the request is over). None when there is nothing to say.
        `logprobs`: per token, (its logprob, the top (id, logprob)) when the request asked for them."""
        if token_ids and entry.first_token_at is None:
            entry.first_token_at = time.monotonic()
        deltas: list[str] = []
        for i, token in enumerate(token_ids):
            entry.output_ids.append(token)
            delta, reason = entry.text.accept(token)
            deltas.append(delta)
            if reason is not None:
                return self.finish(entry, reason, "".join(deltas), tuple(token_ids[:i + 1]),
                                   self._logprobs(token_ids[:i + 1], logprobs))
        if then is not None:
            return self.finish(entry, then, "".join(deltas) + entry.text.finish(), tuple(token_ids),
                               self._logprobs(token_ids, logprobs))
        if not token_ids:
            return None
        return self._chunk(entry, GenerationChunk(entry.request_id, "".join(deltas), tuple(token_ids),
                                                  logprobs=self._logprobs(token_ids, logprobs)))

    def _logprobs(self, token_ids: Sequence[int], logprobs: Sequence) -> tuple[TokenLogprob, ...]:
        """The tokens' logprobs with their texts (each token decoded alone, special tokens kept)."""
        def text(token: int) -> str:
            return self._tokenizer.decode([token], skip_special_tokens=False)

        return tuple(TokenLogprob(token, text(token), lp[0], tuple((t, text(t), v) for t, v in lp[1]))
                     for token, lp in zip(token_ids, logprobs, strict=False) if lp is not None)

    def finish(self, entry: TextRequest, reason: FinishReason, text: str = "", token_ids: tuple[int, ...] = (),
               logprobs: tuple[TokenLogprob, ...] = ()) -> GenerationChunk:
        """End a request: counted, timed, out of the book; its final chunk."""
        now = time.monotonic()
        self.drop(entry)
        arrival = entry.request.arrival
        started = entry.started if entry.started is not None else now
        timings = Timings(queue_seconds=started - arrival,
                          time_to_first_token_seconds=(entry.first_token_at or now) - arrival,
                          total_seconds=now - arrival)
        if entry.counted:
            with self._lock:
                self.finished[reason] += 1
            FINISHED.labels(self.model, reason.value).inc()
            if reason is not FinishReason.CANCELLED:  # a request nobody waited for to the end has no latency
                self._ttft.observe(timings.time_to_first_token_seconds)
                self._e2e.observe(timings.total_seconds)
                self._queue.observe(timings.queue_seconds)
        return self._chunk(entry, GenerationChunk(entry.request_id, text, token_ids, reason,
                                                  Usage(len(entry.prompt_ids), len(entry.output_ids)), timings,
                                                  logprobs=logprobs))

    def drop(self, entry: TextRequest) -> None:
        """Out of the book without a finish (the request failed; the caller raises its error)."""
        entry.done = True
        with self._lock:
            if self._entries.get(entry.request_id) is entry:
                del self._entries[entry.request_id]

    def _chunk(self, entry: TextRequest, chunk: GenerationChunk) -> GenerationChunk:
        now = time.monotonic()
        if entry.counted and entry.last_chunk_at is not None and (chunk.text or chunk.token_ids):
            self._itl.observe(now - entry.last_chunk_at)
        entry.last_chunk_at = now
        return chunk

    def publish(self, stats: EngineStats) -> None:
        self._running.set(stats.running)
        self._waiting.set(stats.waiting)


class BookedEngine(Engine):
    """What the torch and vLLM engines share around their own scheduling: the model's config (a TextModelConfig),
    its ModelInfo and the request book, both made from the checkpoint when the engine starts."""

    kind: str  # "torch" | "vllm": ModelInfo.engine

    def __init__(self, cfg):
        self.name = cfg.name
        self.cfg = cfg
        self.info = None
        self.book: RequestBook | None = None

    @property
    def finished(self) -> collections.Counter[FinishReason]:
        return self.book.finished if self.book is not None else collections.Counter()

    def open_book(self, checkpoint, device: str) -> None:
        """Called by start() once the checkpoint is known (hf_loading.Checkpoint); `device` as the engine runs."""
        c = self.cfg
        self.book = RequestBook(self.name, checkpoint, max_running=c.max_batch_size, max_queue=c.max_queue,
                                max_new_tokens_limit=c.max_new_tokens_limit)
        self.info = checkpoint.model_info(c, engine=self.kind, device=device)

    def healthy(self) -> bool:
        return self.stats().healthy

    def chat_prompt(self, messages: Sequence[ChatMessage]) -> str:
        if self.book is None:
            raise EngineUnavailableError(f"model {self.name!r} has not started")
        tokenizer = self.book.tokenizer
        bos_id = getattr(tokenizer, "bos_token_id", None)
        return render_chat(tokenizer, template_of(tokenizer, self.cfg.chat_template), messages, self.name,
                           adds_bos=bos_id is not None and bos_id in self.book.prompts.encode_now(""))
