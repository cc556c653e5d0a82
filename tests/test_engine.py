"""The torch engine called in-process: slot release timing, abort, shutdown."""

import asyncio

import pytest
from torch.overrides import TorchFunctionMode

from prunefusion.server.config import TorchModelConfig
from prunefusion.server.engines.base import (
    EngineUnavailableError,
    FinishReason,
    GenerationRequest,
    QueueFullError,
    SamplingParams,
    collect,
)
from prunefusion.server.engines.torch_engine import TorchEngine


@pytest.fixture(params=[True, False], ids=["slots", "transformers"])
async def engine(pico_dir, request):
    e = TorchEngine(TorchModelConfig(name="pico", path=str(pico_dir), max_batch_size=4, max_queue=2,
                                     fast_decode=request.param))
    await e.start()
    assert e.decode_path == ("slots" if request.param else "transformers")
    yield e
    await e.shutdown()


def request(rid: str, n: int = 150) -> GenerationRequest:
    return GenerationRequest(rid, "The os module", SamplingParams(max_new_tokens=n))


async def wait_until(predicate, timeout=60.0):
    """Generous: on a loaded 2-core CI machine the engine thread can take seconds to get the CPU."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.002)


async def test_a_cancelled_consumer_frees_its_slot_within_one_step(engine):
    keep_going = asyncio.create_task(collect(engine.generate(request("other"))))
    received = []

    async def consume():
        async for chunk in engine.generate(request("victim")):
            received.append(chunk)

    consumer = asyncio.create_task(consume())
    await wait_until(lambda: engine.stats().running == 2 and len(received) >= 3)
    victim = engine.book.get("victim")
    tokens_at_cancel = len(victim.output_ids)
    consumer.cancel()  # what grpc.aio does to a handler whose client cancelled or went away
    await wait_until(lambda: victim.done)
    # the step already running may add one token; the next step runs without the row
    assert len(victim.output_ids) <= tokens_at_cancel + 1
    assert engine.finished[FinishReason.CANCELLED] == 1
    await wait_until(lambda: engine.stats().running == 1)
    result = await keep_going
    assert result.finish_reason in (FinishReason.LENGTH, FinishReason.EOS)


async def test_closing_the_stream_aborts_the_request(engine):
    stream = engine.generate(request("a"))
    await anext(stream)
    await wait_until(lambda: engine.stats().running == 1)
    row = engine.book.get("a")
    await stream.aclose()  # what every front end does when its client goes away
    await wait_until(lambda: row.done and engine.stats().running == 0)
    assert engine.finished[FinishReason.CANCELLED] == 1
    assert len(row.output_ids) < 150


async def test_the_queue_bound_holds_while_a_step_prefills_newcomers(engine, monkeypatch):
    """max_batch_size 4 + max_queue 2: six requests in flight, and a seventh is refused even while the first step is
    still prefilling the first four (they count as running, not waiting)."""
    import threading

    release, entered = threading.Event(), threading.Event()
    embeddings = engine._loaded.model.get_input_embeddings()  # the first module either path's prefill calls
    real_forward = embeddings.forward

    def held_forward(*args, **kwargs):  # the engine thread waits here until the test has tried to overfill
        entered.set()
        release.wait(30)
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(embeddings, "forward", held_forward)
    tasks = [asyncio.create_task(collect(engine.generate(request(f"r{i}", 3)))) for i in range(6)]
    await wait_until(entered.is_set)  # the first step is running: it took four newcomers off the queue
    assert engine.stats().running == 4 and engine.stats().waiting == 2
    try:
        with pytest.raises(QueueFullError):
            await anext(engine.generate(request("seventh")))
    finally:
        release.set()
    results = await asyncio.gather(*tasks)
    assert all(r.finish_reason in (FinishReason.LENGTH, FinishReason.EOS) for r in results)


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
    e = TorchEngine(TorchModelConfig(name="pico", path=str(pico_dir)))
    await e.start()
    task = asyncio.create_task(collect(e.generate(request("a", 200))))
    await wait_until(lambda: e.stats().running == 1)
    await e.shutdown()
    assert (await task).finish_reason is FinishReason.CANCELLED
    with pytest.raises(EngineUnavailableError):
        await anext(e.generate(request("b")))


def fail_forward_call(monkeypatch, engine, call: int, message: str) -> None:
    """Make the engine model's `call`-th forward pass (counting from 1) raise RuntimeError(message). Every pass of
    either path (prefill, prefill chunk, decode step) embeds its input tokens once."""
    model = engine._loaded.model.get_input_embeddings()
    real_forward = model.forward
    calls = {"n": 0}

    def forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise RuntimeError(message)
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", forward)


async def test_a_failing_model_step_fails_its_requests_not_the_engine(engine, monkeypatch):
    fail_forward_call(monkeypatch, engine, 1, "simulated device failure")
    with pytest.raises(RuntimeError, match="simulated device failure"):
        await collect(engine.generate(request("doomed", 5)))
    assert engine.stats() == engine.stats().__class__(running=0, waiting=0, healthy=True)
    result = await collect(engine.generate(request("after", 5)))
    assert result.usage.completion_tokens == 5


async def test_a_failure_later_in_a_step_keeps_the_chunks_of_requests_finished_before_it(engine, monkeypatch):
    fail_forward_call(monkeypatch, engine, 2, "simulated out of memory")
    # both join in the same step: the first finishes at its prefill (one token), the second's prefill fails
    first = asyncio.create_task(collect(engine.generate(request("one-token", 1))))
    second = asyncio.create_task(collect(engine.generate(request("doomed", 5))))
    done = await asyncio.wait_for(first, 10)
    assert done.usage.completion_tokens == 1
    with pytest.raises(RuntimeError, match="simulated"):
        await asyncio.wait_for(second, 10)


async def test_a_tiny_temperature_is_greedy_and_cannot_break_the_batch(engine):
    greedy = collect(engine.generate(request("greedy", 20)))
    tiny = collect(engine.generate(GenerationRequest("tiny", "The os module",
                                                     SamplingParams(max_new_tokens=20, temperature=1e-40))))
    a, b = await asyncio.gather(greedy, tiny)
    assert a.token_ids == b.token_ids


async def test_long_prompts_are_tokenized_off_the_event_loop_with_the_same_result(engine, monkeypatch):
    import prunefusion.server.engines.prompts as prompts

    inline = await collect(engine.generate(request("inline", 10)))
    calls = []
    real_to_thread = asyncio.to_thread

    async def spy(fn, *args):
        calls.append(fn.__name__)
        return await real_to_thread(fn, *args)

    monkeypatch.setattr(prompts, "INLINE_TOKENIZE_CHARS", 4)
    monkeypatch.setattr(prompts.asyncio, "to_thread", spy)
    threaded = await collect(engine.generate(request("threaded", 10)))
    assert calls == ["encode_now"]
    assert threaded.token_ids == inline.token_ids and threaded.usage == inline.usage


async def test_a_request_cancelled_in_the_middle_of_its_chunked_prefill_leaves_no_trace(pico_dir):
    """Prefill 4 tokens per step: the long prompt is cancelled while staged, the one behind it still gets what it
    gets alone, and the staged slot is free again."""
    e = TorchEngine(TorchModelConfig(name="pico", path=str(pico_dir), max_batch_size=2, prefill_chunk_tokens=4,
                                     prefix_cache_tokens=0))
    await e.start()
    try:
        alone = await collect(e.generate(request("alone", 8)))
        passes = e.prefill_passes
        long = GenerationRequest("long", "The os module " * 20, SamplingParams(max_new_tokens=5))
        stream = e.generate(long)
        pending = asyncio.create_task(anext(stream))
        await wait_until(lambda: e.prefill_passes >= passes + 2)  # its prompt is half in its slot
        pending.cancel()  # the consumer goes away: the stream's finally cancels the request
        with pytest.raises(asyncio.CancelledError):
            await pending
        after = await collect(e.generate(request("after", 8)))
        tokens = len(e.book.prompts.encode_now(long.prompt))
        assert tokens >= 40 and e.prefill_passes < passes + tokens // 4  # the long prompt never finished its prefill
        assert e._kv.staged is None and e.stats().running == 0
        assert list(after.token_ids) == list(alone.token_ids)
    finally:
        await e.shutdown()


class TorchCalls(TorchFunctionMode):
    """The torch functions called on this thread while active (a TorchFunctionMode is per thread)."""

    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.add(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("fast_decode", [True, False], ids=["slots", "transformers"])
async def test_the_event_loop_thread_runs_no_tensor_op(pico_dir, fast_decode):
    """Every tensor op runs on the engine's model thread: a parallel op on the event loop's thread gives that
    thread an OpenMP pool for the life of the process, and beside it every decode step of the model thread ran at
    about half speed (the slot cache once was allocated there: 729 -> 1,471 tok/s at 16 streams when moved)."""
    e = TorchEngine(TorchModelConfig(name="pico", path=str(pico_dir), max_batch_size=4, fast_decode=fast_decode))
    with TorchCalls() as calls:
        await e.start()
        await collect(e.generate(GenerationRequest("sampled", "The os module",
                                                   SamplingParams(max_new_tokens=4, temperature=0.8, seed=3))))
        await collect(e.generate(request("greedy", 4)))
    await e.shutdown()
    assert calls.names <= {"device"}, calls.names  # torch.device(...) makes no tensor


async def test_a_decode_step_that_fails_to_compile_decodes_eager(pico_dir, monkeypatch, caplog):
    """No C++ compiler for inductor, say: the engine logs it and serves the same tokens eager."""
    from prunefusion.server.engines import slot_kv

    def no_compiler(self, model, batch_sizes):
        raise RuntimeError("inductor: no working C++ compiler found")

    eager = TorchEngine(TorchModelConfig(name="pico", path=str(pico_dir), max_batch_size=2))
    await eager.start()
    expected = await collect(eager.generate(request("eager", 12)))
    await eager.shutdown()
    monkeypatch.setattr(slot_kv.SlotKV, "compile", no_compiler)
    e = TorchEngine(TorchModelConfig(name="pico", path=str(pico_dir), max_batch_size=2, compile_decode=True))
    await e.start()
    try:
        got = await collect(e.generate(request("fallback", 12)))
    finally:
        await e.shutdown()
    assert e.compile_seconds is None and e._kv.compiled_passes == 0
    assert "compiling the decode step failed" in caplog.text
    assert got.token_ids == expected.token_ids
