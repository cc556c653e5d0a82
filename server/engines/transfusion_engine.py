"""The Transfusion engine: a micro-batcher in front of the samplers.

Requests wait in one queue (micro_batcher.py, shared with the embedding engines). The batcher takes the oldest
request, waits up to `max_wait` for more requests of the same kind (images with the same number of steps; captions),
and runs up to `max_batch_size` of them in one sampler call on the model's own thread. Each image request keeps its
own seed and its own scheduler (see sampling.py), so an image does not depend on what it was batched with. A request
cancelled or past its deadline while waiting is dropped before it costs a forward pass; an image request inside a
running batch leaves it at the next denoising step (its rows are dropped, as the text engine drops a cancelled row
between decode steps). Captions, a few greedy steps for the whole batch, finish with their batch and a cancelled
caller's result is dropped.

It implements the `ImageEngine` contract (base.py); front ends never see the sampler or its torch types.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np

from prunefusion.server.config import TransfusionModelConfig
from prunefusion.server.engines.base import (
    CaptionRequest,
    CaptionResult,
    EngineStats,
    EngineUnavailableError,
    ImageEngine,
    ImageGenerationRequest,
    ImageLimits,
    ImagePart,
    ImageResult,
    InterleavedRequest,
    InvalidRequestError,
    ModelInfo,
    QueueFullError,
    TextPart,
)
from prunefusion.server.engines.compute_thread import ComputeThread
from prunefusion.server.engines.micro_batcher import Job, MicroBatcher

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Job(Job):
    kind: str  # "image" | "caption"
    key: tuple  # batch compatibility
    payload: object  # ImageRequest | uint8 image
    stop: threading.Event = field(default_factory=threading.Event)  # set when the caller is gone (model thread reads)

    def stopped(self) -> bool:
        return self.stop.is_set() or self.expired()


@dataclass(frozen=True)
class _BatchResult:
    value: object
    queue_seconds: float
    batch_size: int


class TransfusionEngine(ImageEngine):
    def __init__(self, cfg: TransfusionModelConfig) -> None:
        self.name, self.cfg = cfg.name, cfg
        self.sampler = None
        self.info: ModelInfo | None = None
        self.limits: ImageLimits | None = None
        self._compute = ComputeThread(f"transfusion-{cfg.name}")
        self._batcher: MicroBatcher[_Job] = MicroBatcher(f"transfusion-batcher-{cfg.name}", select=self._take,
                                                         full=self._full, run=self._run_batch)
        self._running = 0
        self._streams = 0  # interleaved generations in progress (they share the model thread with the batches)

    # ---- lifecycle -------------------------------------------------------------------------------------------------
    async def start(self) -> None:
        import torch

        from prunefusion.checkpoints import digest_files
        from prunefusion.transfusion.sampling import ImageRequest, TransfusionSampler

        cfg, images = self.cfg, self.cfg.images
        path = cfg.resolved_path
        self.sampler = await self._compute.run(lambda: TransfusionSampler.load(
            path, device=cfg.device, dtype=getattr(torch, cfg.dtype)))
        c = self.sampler.config
        if images.max_size < c.image_size:
            raise ValueError(f"model {self.name!r}: max_size {images.max_size} is below the model's image size "
                             f"{c.image_size}: no image could be accepted or returned")
        await self._compute.run(lambda: self.sampler.generate_images([ImageRequest("", 1, 1.0)]))
        self.limits = ImageLimits(
            image_size=c.image_size, max_size=images.max_size, max_steps=images.max_steps,
            default_steps=images.default_steps, default_guidance_scale=images.default_guidance_scale,
            max_caption_tokens=images.max_caption_tokens, max_batch_size=cfg.max_batch_size,
            max_wait_seconds=images.max_wait_ms / 1000)
        self.info = ModelInfo(
            name=self.name, family="transfusion", num_layers=c.n_layers,
            num_parameters=sum(p.numel() for p in self.sampler.model.parameters()),
            weights_digest=digest_files([path / "model.safetensors"]), engine="transfusion",
            context_length=c.max_text_positions, max_new_tokens_limit=images.max_caption_tokens,
            default_max_new_tokens=images.max_caption_tokens, path=str(path), device=cfg.device, dtype=cfg.dtype)
        self._batcher.start(self.limits.max_wait_seconds)

    async def shutdown(self) -> None:
        """Refuse new requests, fail the waiting ones, let a running batch finish (its callers get their results),
        then stop the batcher and the model thread without blocking the event loop."""
        await self._batcher.close(EngineUnavailableError(f"model {self.name!r} is shutting down"))
        await self._compute.shutdown()

    def stats(self) -> EngineStats:
        return EngineStats(running=self._running + self._streams, waiting=len(self._batcher.live()),
                           healthy=self._batcher.healthy)

    # ---- requests --------------------------------------------------------------------------------------------------
    def check_prompt(self, prompt: str, field_name: str = "prompt") -> None:
        if not prompt.strip():
            raise InvalidRequestError(field_name, "must not be empty")
        if not self.sampler.tokenizer.words(prompt):  # "!!!" would otherwise draw from an empty prompt
            raise InvalidRequestError(field_name, "has no words (letters or digits)")
        unknown = self.sampler.tokenizer.unknown_words(prompt)
        if unknown:
            raise InvalidRequestError(field_name, f"words unknown to model {self.name!r}: {sorted(set(unknown))}")
        if len(self.sampler.tokenizer.encode(prompt)) + 2 > self.sampler.config.max_text_positions:
            raise InvalidRequestError(field_name, "is too long for the model")

    async def generate_image(self, request: ImageGenerationRequest) -> ImageResult:
        from prunefusion.transfusion.sampling import ImageRequest

        payload = ImageRequest(request.prompt, request.steps, request.guidance_scale, request.seed)
        result = await self._submit("image", ("image", request.steps), payload, request.deadline)
        return ImageResult(result.value, result.queue_seconds, result.batch_size)

    async def caption(self, request: CaptionRequest) -> CaptionResult:
        result = await self._submit("caption", ("caption",), request.image, request.deadline)
        words = result.value.split()[:request.max_tokens]  # captions are word tokens: a shorter limit is a prefix
        return CaptionResult(" ".join(words), result.queue_seconds, result.batch_size)

    async def interleaved(self, request: InterleavedRequest) -> AsyncIterator[TextPart | ImagePart]:
        """Parts from the sampler's interleaved generator, each step run on the model thread (between batches). A
        deadline that passes between two parts raises TimeoutError."""
        if self._batcher.closed:
            raise EngineUnavailableError(f"model {self.name!r} is shutting down")
        waiting = len(self._batcher.live())
        if self._streams + waiting >= self.cfg.max_queue:
            raise QueueFullError(f"model {self.name!r}: {self._streams} streams and {waiting} requests waiting",
                                 retry_after_s=0.5)
        self._streams += 1
        halt = threading.Event()  # set when the caller is gone: the model thread stops at its next step
        r = request
        parts = self.sampler.interleaved(r.prompt, max_tokens=r.max_tokens, max_images=r.max_images, steps=r.steps,
                                         guidance_scale=r.guidance_scale, seed=r.seed,
                                         stopped=lambda: halt.is_set() or self._batcher.closed)
        done = object()
        try:
            while True:
                if not self._batcher.closed:
                    part = await self._compute.run(next, parts, done)
                if self._batcher.closed:  # the sampler stops early for a shutdown: that is not a finished stream
                    raise EngineUnavailableError(f"model {self.name!r} is shutting down")
                if part is done:
                    return
                if r.deadline is not None and time.monotonic() > r.deadline:
                    raise TimeoutError("deadline passed during interleaved generation")
                kind, value = part
                yield TextPart(" " + value) if kind == "text" else ImagePart(value)  # text comes as words
        finally:
            self._streams -= 1
            halt.set()
            with contextlib.suppress(RuntimeError):  # the model thread is already shut down: GC closes the generator
                await self._compute.run(parts.close)

    async def _submit(self, kind: str, key: tuple, payload, deadline: float | None) -> _BatchResult:
        if self._batcher.closed:
            raise EngineUnavailableError(f"model {self.name!r} is shutting down")
        waiting = len(self._batcher.live())  # cancelled and expired requests do not count
        if waiting + self._streams >= self.cfg.max_queue:
            raise QueueFullError(f"model {self.name!r}: {waiting} requests waiting", retry_after_s=0.5)
        job = _Job(asyncio.get_running_loop().create_future(), kind, key, payload, deadline=deadline)
        job.future.add_done_callback(lambda _: job.stop.set())  # cancelled, failed or answered: stop working on it
        return await self._batcher.submit(job)

    # ---- the batcher's callbacks (micro_batcher.py): one batch holds requests of one kind and settings ------------
    def _full(self, waiting: list[_Job]) -> bool:
        return len(self._take(waiting)) >= self.cfg.max_batch_size

    def _take(self, waiting: list[_Job]) -> list[_Job]:
        return [j for j in waiting if j.key == waiting[0].key][: self.cfg.max_batch_size] if waiting else []

    async def _run_batch(self, batch: list[_Job]) -> None:
        """Run the batch on the model thread and hand out the results."""
        started = time.monotonic()
        self._running = len(batch)
        try:
            values = await self._compute.run(self._run, batch)
        except Exception as err:  # noqa: BLE001 - the batch's callers get the error, the loop lives on
            log.exception("transfusion batch failed")
            values = [err] * len(batch)
        finally:
            self._running = 0
        for job, value in zip(batch, values, strict=True):
            if job.future.done():
                continue
            if isinstance(value, Exception):
                job.future.set_exception(value)
            elif value is None:  # the sampler dropped it: its deadline passed inside the batch
                job.future.set_exception(TimeoutError("deadline passed while generating"))
            else:
                job.future.set_result(_BatchResult(value, started - job.arrival, len(batch)))

    def _run(self, batch: list[_Job]) -> list:
        if batch[0].kind == "image":
            return self.sampler.generate_images([job.payload for job in batch], stopped=lambda i: batch[i].stopped())
        images = np.stack([job.payload for job in batch])
        return self.sampler.caption(images, max_tokens=self.limits.max_caption_tokens)
