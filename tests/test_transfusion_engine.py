"""The Transfusion engine's batcher without gRPC: a request cancelled or past its deadline leaves a running batch at
the next denoising step, a batch nobody waits for stops, a full queue refuses, and an interleaved stream cancelled
mid-image frees the model thread."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from prunefusion.server.config import TransfusionModelConfig
from prunefusion.server.engines.base import (
    ImageGenerationRequest,
    InterleavedRequest,
    InvalidRequestError,
    QueueFullError,
)
from prunefusion.server.engines.transfusion_engine import TransfusionEngine
from prunefusion.transfusion.sampling import ImageRequest

LONG = 1000  # denoising steps: a batch that certainly outlives the test's cancellations


def config(path, max_wait_s: float = 0.01, max_queue: int = 64, **images) -> TransfusionModelConfig:
    return TransfusionModelConfig(name="pico-tf", path=str(path), engine="transfusion", max_batch_size=8,
                                  max_queue=max_queue, images={"max_wait_ms": max_wait_s * 1000, **images})


def image(prompt: str, steps: int, guidance: float, seed: int, deadline: float | None = None):
    return ImageGenerationRequest(prompt, steps, guidance, seed, deadline)


async def started(path, **options) -> tuple[TransfusionEngine, list[int]]:
    """An engine on the pico model, and the rows of every denoising forward pass it runs (model thread)."""
    engine = TransfusionEngine(config(path, max_steps=LONG, **options))
    await engine.start()
    rows: list[int] = []
    predict = engine.sampler._predict
    engine.sampler._predict = lambda noisy, *rest: rows.append(len(noisy)) or predict(noisy, *rest)
    return engine, rows


async def until(condition, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.002)


def test_cancelled_and_expired_requests_leave_a_running_batch(transfusion_dir):
    async def main():
        engine, rows = await started(transfusion_dir, max_wait_s=0.05)
        try:
            kept = asyncio.create_task(engine.generate_image(image("a red circle", LONG, 3.0, 1)))
            gone = asyncio.create_task(engine.generate_image(image("a blue square", LONG, 3.0, 2)))
            expiring = asyncio.create_task(engine.generate_image(image("a green circle", LONG, 3.0, 3,
                                                                       time.monotonic() + 0.5)))
            await until(lambda: len(rows) >= 2)  # one batch of 3 guided requests: 6 rows per step
            gone.cancel()
            with pytest.raises(TimeoutError, match="deadline"):
                await expiring
            result = await kept
            assert result.batch_size == 3 and len(rows) == LONG
            assert rows[0] == 6 and rows[-1] == 2 and 4 in rows  # 3 requests, then 2, then 1 (x guidance rows)
            assert rows == sorted(rows, reverse=True)
            alone = engine.sampler.generate_images([ImageRequest("a red circle", LONG, 3.0, 1)])[0]
            assert abs(alone.astype(int) - result.pixels).max() <= 1  # leaving rows does not change the others
        finally:
            await engine.shutdown()

    asyncio.run(main())


def test_a_batch_nobody_waits_for_stops_and_a_full_queue_refuses(transfusion_dir):
    async def main():
        engine, rows = await started(transfusion_dir, max_wait_s=0.05, max_queue=2)
        try:
            tasks = [asyncio.create_task(engine.generate_image(image("a red circle", LONG, 3.0, s)))
                     for s in range(2)]
            await asyncio.sleep(0)  # both are waiting in the batch window: the queue is full
            with pytest.raises(QueueFullError):
                await engine.generate_image(image("a red circle", 2, 3.0, 9))
            await until(lambda: len(rows) >= 2)
            for task in tasks:
                task.cancel()
            quick = await engine.generate_image(image("a blue square", 2, 3.0, 1))  # runs next
            assert quick.batch_size == 1 and len(rows) < LONG  # the abandoned batch stopped early
            with pytest.raises(InvalidRequestError, match="no words"):
                engine.check_prompt("!!! ???")
        finally:
            await engine.shutdown()

    asyncio.run(main())


def interleaved_image_task(engine: TransfusionEngine) -> asyncio.Task:
    """An interleaved stream whose first part is a LONG-step image: the pico model's logits are biased to <boi>."""
    model = engine.sampler.model
    to_image = torch.zeros(model.config.vocab_size)
    to_image[engine.sampler.tokenizer.boi_id] = 1e4
    lm_logits = model.lm_logits
    model.lm_logits = lambda hidden: lm_logits(hidden) + to_image

    async def consume():
        async for _ in engine.interleaved(InterleavedRequest("a red circle", max_tokens=4, max_images=1, steps=LONG,
                                                             guidance_scale=3.0, seed=2**64 - 1)):
            pass

    return asyncio.create_task(consume())


def test_an_interleaved_stream_cancelled_mid_image_frees_the_model_thread(transfusion_dir):
    async def main():
        engine, rows = await started(transfusion_dir)
        try:
            task = interleaved_image_task(engine)
            await until(lambda: len(rows) >= 2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await until(lambda: engine.stats().running == 0)
            done_at = len(rows)
            await asyncio.sleep(0.2)
            assert len(rows) == done_at < LONG  # the image stopped at its next step, not after 1000
        finally:
            await engine.shutdown()

    asyncio.run(main())


def test_a_shutdown_during_an_interleaved_image_is_unavailable_not_internal(transfusion_dir):
    from prunefusion.server.engines.base import EngineUnavailableError

    async def main():
        engine, rows = await started(transfusion_dir)
        task = interleaved_image_task(engine)
        await until(lambda: len(rows) >= 2)
        await engine.shutdown()  # returns once the model thread stopped: the image ends at its next step
        assert len(rows) < LONG
        with pytest.raises(EngineUnavailableError, match="shutting down"):
            await task

    asyncio.run(main())


def test_a_max_size_below_the_models_image_size_fails_at_start(transfusion_dir):
    engine = TransfusionEngine(config(transfusion_dir, max_size=16))
    with pytest.raises(ValueError, match="max_size 16 is below the model's image size 32"):
        asyncio.run(engine.start())


def test_a_request_that_expires_while_waiting_costs_no_forward_pass(transfusion_dir):
    async def main():
        engine, rows = await started(transfusion_dir, max_wait_s=0.3)
        try:
            with pytest.raises(TimeoutError, match="waiting"):
                await engine.generate_image(image("a red circle", 4, 3.0, 1, time.monotonic() + 0.05))
            assert rows == [] and engine.stats().waiting == 0
        finally:
            await engine.shutdown()

    asyncio.run(main())
