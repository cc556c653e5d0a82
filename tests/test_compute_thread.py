"""ComputeThread: an engine's model thread exits while the engine is idle (an idle thread's OpenMP pool slowed the
busy engine beside it to about half its speed, see server/engines/compute_thread.py), and calls still run one at
a time, in order, on one thread."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from prunefusion.server.engines.compute_thread import ComputeThread


def threads_named(prefix: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(prefix)]


def test_the_thread_exits_when_idle_and_a_new_one_serves_the_next_call():
    async def scenario():
        compute = ComputeThread("ct-idle", idle_seconds=0.05)
        first = await compute.run(lambda: threading.current_thread().ident)
        assert compute.alive and len(threads_named("ct-idle")) == 1
        again = await compute.run(lambda: threading.current_thread().ident)
        assert again == first  # busy back to back: the same thread
        deadline = time.monotonic() + 5
        while threads_named("ct-idle") and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert not compute.alive and threads_named("ct-idle") == []  # idle: gone, with its OpenMP pool
        later = await compute.run(lambda: threading.current_thread().name)
        assert later.startswith("ct-idle")
        await compute.shutdown()
        assert threads_named("ct-idle") == []
        with pytest.raises(RuntimeError, match="shut down"):
            await compute.run(lambda: None)

    asyncio.run(scenario())


def test_calls_run_one_at_a_time_in_order():
    async def scenario():
        compute = ComputeThread("ct-order", idle_seconds=0.05)
        running, order, overlaps = [0], [], []

        def work(i):
            running[0] += 1
            overlaps.append(running[0])
            time.sleep(0.01)
            order.append(i)
            running[0] -= 1
            return i

        assert await asyncio.gather(*(compute.run(work, i) for i in range(8))) == list(range(8))
        assert order == list(range(8)) and max(overlaps) == 1
        await compute.shutdown()

    asyncio.run(scenario())


def test_an_idle_torch_engine_lets_its_thread_go(pico_dir):
    from prunefusion.server.config import TorchModelConfig
    from prunefusion.server.engines.base import GenerationRequest, SamplingParams, collect
    from prunefusion.server.engines.torch_engine import TorchEngine

    async def scenario():
        engine = TorchEngine(TorchModelConfig(name="idle-lm", path=str(pico_dir), max_batch_size=2))
        engine._compute.idle_seconds = 0.1
        await engine.start()
        try:
            out = await collect(engine.generate(GenerationRequest("a", "hello", SamplingParams(max_new_tokens=3))))
            assert len(out.token_ids) > 0
            deadline = time.monotonic() + 5
            while threads_named("engine-idle-lm") and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert threads_named("engine-idle-lm") == []
            again = await collect(engine.generate(GenerationRequest("b", "hello", SamplingParams(max_new_tokens=3))))
            assert again.token_ids == out.token_ids  # a new thread, the same model and answer
        finally:
            await engine.shutdown()

    asyncio.run(scenario())
