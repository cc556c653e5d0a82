"""The torch engine called in-process: slot release timing, abort, shutdown."""

import asyncio
import contextlib

import pytest

from prunefusion.server.engines.base import (
    EngineUnavailableError,
    FinishReason,
    GenerationRequest,
    QueueFullError,
    SamplingParams,
    collect,
)
from prunefusion.server.engines.torch_engine import TorchEngine, TorchEngineOptions


@pytest.fixture()
async def engine(pico_dir):
    e = TorchEngine("pico", TorchEngineOptions(path=str(pico_dir), max_batch_size=4, max_queue=2))
    await e.start()
    yield e
    await e.shutdown()


def request(rid: str, n: int = 150) -> GenerationRequest:
    return GenerationRequest(rid, "The os module", SamplingParams(max_new_tokens=n))


async def wait_until(predicate, timeout=5.0):
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0)


async def test_closing_the_stream_frees_the_slot_within_one_step(engine):
    keep_going = asyncio.create_task(collect(engine.generate(request("other"))))
    await wait_until(lambda: engine.stats().running == 1)
    async with contextlib.aclosing(engine.generate(request("victim"))) as stream:
        async for chunk in stream:
            if len(chunk.token_ids) and engine.stats().running == 2:
                break
        steps_at_cancel = engine.steps
    await wait_until(lambda: engine.stats().running == 1)
    # a step already running may finish; the next one runs without the cancelled row
    assert engine.steps - steps_at_cancel <= 1
    assert engine.finished[FinishReason.CANCELLED] == 1
    result = await keep_going
    assert result.finish_reason in (FinishReason.LENGTH, FinishReason.EOS)


async def test_abort_by_request_id(engine):
    task = asyncio.create_task(collect(engine.generate(request("a"))))
    await wait_until(lambda: engine.stats().running == 1)
    await engine.abort("a")
    result = await task
    assert result.finish_reason is FinishReason.CANCELLED
    assert result.usage.completion_tokens < 150


async def test_queue_bound_and_duplicate_ids(engine):
    tasks = [asyncio.create_task(collect(engine.generate(request(f"r{i}")))) for i in range(4)]
    await wait_until(lambda: engine.stats().running == 4)  # every slot taken
    tasks += [asyncio.create_task(collect(engine.generate(request(f"r{i}")))) for i in range(4, 6)]
    await wait_until(lambda: engine.stats().waiting == 2)  # the queue is full
    with pytest.raises(QueueFullError):
        await anext(engine.generate(request("one-too-many")))
    from prunefusion.server.engines.base import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="request_id"):
        await anext(engine.generate(request("r5")))
    results = await asyncio.gather(*tasks)
    assert all(r.finish_reason in (FinishReason.LENGTH, FinishReason.EOS) for r in results)


async def test_shutdown_cancels_in_flight_and_refuses_new(pico_dir):
    e = TorchEngine("pico", TorchEngineOptions(path=str(pico_dir)))
    await e.start()
    task = asyncio.create_task(collect(e.generate(request("a", 200))))
    await wait_until(lambda: e.stats().running == 1)
    await e.shutdown()
    assert (await task).finish_reason is FinishReason.CANCELLED
    with pytest.raises(EngineUnavailableError):
        await anext(e.generate(request("b")))
