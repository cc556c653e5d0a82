"""What both embedding engines share: the tokenizer, the request checks and a micro-batcher in front of the model.

Requests wait in one queue (micro_batcher.py, shared with the image engine). The batcher takes the oldest request,
waits up to `max_wait_ms` for more until their texts fill `max_batch_size`, and runs them together on the model's
own thread (one forward pass per `max_batch_size` texts, longest first, each pass padded to its own longest text). A
request cancelled or past its deadline while waiting is dropped before it costs a forward pass. Each text's vector
depends only on that text: padding is masked out of attention and of the mean, so a batch changes nothing but float
rounding.

Texts are tokenized with the checkpoint's own tokenizer.json (the fast tokenizer sentence-transformers uses) and cut
to `max_tokens` ([CLS] and [SEP] kept), as sentence-transformers does; with `truncate: false` a longer text is
refused instead, naming `texts[i]`. Subclasses load a model and embed one padded batch (`_load`, `_encode`).
"""

from __future__ import annotations

import abc
import asyncio
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from prunefusion.server.config import EmbeddingModelConfig
from prunefusion.server.engines.base import (
    EmbeddingEngine,
    EmbeddingLimits,
    EmbeddingResult,
    EngineStats,
    EngineUnavailableError,
    InvalidRequestError,
    ModelInfo,
    QueueFullError,
)
from prunefusion.server.engines.compute_thread import ComputeThread
from prunefusion.server.engines.micro_batcher import Job, MicroBatcher
from prunefusion.server.metrics import BATCH_SIZE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    """What a subclass's `_load` reports about the model it loaded."""

    dimensions: int
    num_parameters: int
    weights_digest: str


@dataclass(eq=False)
class _Job(Job):
    ids: list[list[int]]


def default_max_tokens(model_dir: Path) -> int:
    """sentence_bert_config.json's max_seq_length (what sentence-transformers truncates to), else the model's
    max_position_embeddings."""
    st_config = model_dir / "sentence_bert_config.json"
    if st_config.is_file():
        return int(json.loads(st_config.read_text())["max_seq_length"])
    return int(json.loads((model_dir / "config.json").read_text()).get("max_position_embeddings", 512))


class BatchedEmbeddingEngine(EmbeddingEngine):
    engine_name: ClassVar[str]  # ModelInfo.engine

    def __init__(self, cfg: EmbeddingModelConfig) -> None:
        self.name, self.cfg = cfg.name, cfg
        self.info: ModelInfo | None = None
        self.limits: EmbeddingLimits | None = None
        self._tokenizer = None
        self._compute = ComputeThread(f"embed-{cfg.name}")
        self._batcher: MicroBatcher[_Job] = MicroBatcher(f"embedding-batcher-{cfg.name}", select=self._take,
                                                         full=self._full, run=self._run_batch)
        self._running = 0

    # ---- what a subclass provides (both run on the model thread) --------------------------------------------------
    @abc.abstractmethod
    def _load(self, model_dir: Path) -> LoadedModel:
        """Load the model from `model_dir`."""

    @abc.abstractmethod
    def _encode(self, ids: list[list[int]]) -> np.ndarray:
        """One forward pass over B token-id rows (padded here to the longest, masked) -> float32 [B, dimensions],
        mean-pooled over the attention mask, unit L2 norm (prunefusion.quality.embeddings.pad_batch and
        mean_pool_normalize)."""

    # ---- lifecycle -------------------------------------------------------------------------------------------------
    async def start(self) -> None:
        from tokenizers import Tokenizer

        cfg, options = self.cfg, self.cfg.embeddings
        path = cfg.resolved_path
        config = json.loads((path / "config.json").read_text())
        max_tokens = options.max_tokens or default_max_tokens(path)
        self._tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self._tokenizer.no_padding()  # padded per forward pass, to that pass's longest
        self._tokenizer.enable_truncation(max_tokens)  # counts [CLS] and [SEP]; the cut-off rest is `overflowing`
        self._pad_id = self._tokenizer.token_to_id("[PAD]") or config.get("pad_token_id") or 0
        loaded = await self._compute.run(self._load, path)
        warm = [self._tokenizer.encode("warm up").ids]
        await self._compute.run(self._run, warm)
        self.limits = EmbeddingLimits(
            dimensions=loaded.dimensions, max_tokens=max_tokens,
            truncate=options.truncate, max_inputs=options.max_inputs,
            max_batch_size=cfg.max_batch_size, max_wait_seconds=options.max_wait_ms / 1e3)
        self.info = ModelInfo(
            name=self.name, family=config.get("model_type", ""), num_layers=config.get("num_hidden_layers", 0),
            num_parameters=loaded.num_parameters, weights_digest=loaded.weights_digest, engine=self.engine_name,
            context_length=max_tokens, max_new_tokens_limit=0, default_max_new_tokens=0, path=str(path),
            device=cfg.device, dtype=cfg.dtype)
        self._batcher.start(self.limits.max_wait_seconds)

    async def shutdown(self) -> None:
        """Refuse new requests, fail the waiting ones, let a running batch finish, stop the model thread."""
        await self._batcher.close(EngineUnavailableError(f"model {self.name!r} is shutting down"))
        await self._compute.shutdown()

    def stats(self) -> EngineStats:
        return EngineStats(running=self._running, waiting=len(self._batcher.live()), healthy=self._batcher.healthy)

    # ---- requests --------------------------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text, checked: InvalidRequestError naming `texts` or `texts[i]`."""
        limits = self.limits
        if not texts:
            raise InvalidRequestError("texts", "must hold at least one text")
        if len(texts) > limits.max_inputs:
            raise InvalidRequestError("texts", f"{len(texts)} texts; model {self.name!r} takes at most "
                                               f"{limits.max_inputs} per request")
        for i, text in enumerate(texts):
            if not text.strip():
                raise InvalidRequestError(f"texts[{i}]", "must not be empty")
        encodings = self._tokenizer.encode_batch(list(texts))
        if not limits.truncate:
            for i, e in enumerate(encodings):
                if e.overflowing:
                    raise InvalidRequestError(f"texts[{i}]", f"is longer than the {limits.max_tokens} tokens model "
                                                             f"{self.name!r} takes (truncation is off)")
        return [e.ids for e in encodings]

    async def embed(self, texts: Sequence[str], deadline: float | None = None) -> EmbeddingResult:
        if self._batcher.closed or not self._batcher.started:
            raise EngineUnavailableError(f"model {self.name!r} is not accepting requests")
        waiting = len(self._batcher.live())
        if waiting >= self.cfg.max_queue:
            raise QueueFullError(f"model {self.name!r}: {waiting} requests waiting", retry_after_s=0.5)
        # off the event loop: a long text (the request bound allows a MiB) takes tens of milliseconds to tokenize
        ids = await asyncio.to_thread(self.tokenize, texts)
        return await self._batcher.submit(_Job(asyncio.get_running_loop().create_future(), ids, deadline=deadline))

    # ---- the batcher's callbacks -----------------------------------------------------------------------------------
    def _full(self, waiting: list[_Job]) -> bool:
        return sum(len(j.ids) for j in waiting) >= self.cfg.max_batch_size

    def _take(self, waiting: list[_Job]) -> list[_Job]:
        """The oldest jobs whose texts fit in one batch (the oldest always, however many texts it has)."""
        batch, rows = [], 0
        for job in waiting:
            if batch and rows + len(job.ids) > self.cfg.max_batch_size:
                break
            batch.append(job)
            rows += len(job.ids)
        return batch

    async def _run_batch(self, batch: list[_Job]) -> None:
        started = time.monotonic()
        rows = [ids for job in batch for ids in job.ids]
        self._running = len(batch)
        try:
            vectors = await self._compute.run(self._run, rows)
        except Exception as err:  # noqa: BLE001 - the batch's callers get the error, the loop lives on
            log.exception("embedding batch failed")
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(err)
            return
        finally:
            self._running = 0
        start = 0
        for job in batch:
            n = len(job.ids)
            if not job.future.done():
                job.future.set_result(EmbeddingResult(
                    vectors[start:start + n], sum(len(x) for x in job.ids), started - job.arrival, len(batch),
                    len(rows)))
            start += n

    def _run(self, rows: list[list[int]]) -> np.ndarray:
        """[len(rows), dimensions]: forward passes of at most max_batch_size rows, longest first (less padding)."""
        order = np.argsort([-len(x) for x in rows], kind="stable")
        out: np.ndarray | None = None
        for begin in range(0, len(order), self.cfg.max_batch_size):
            chunk = order[begin:begin + self.cfg.max_batch_size]
            vectors = self._encode([rows[i] for i in chunk])
            if out is None:
                out = np.empty((len(rows), vectors.shape[1]), dtype=np.float32)
            out[chunk] = vectors
            BATCH_SIZE.labels(model=self.name).observe(len(chunk))
        return out
