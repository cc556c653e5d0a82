"""The vLLM adapter's request bookkeeping against a scripted stand-in for vLLM's AsyncLLM (runs without vLLM):
aborts and deadlines that arrive before vLLM has registered the request, and shutdown with a stream that never
ends. The real engine is exercised by the vllm-marked tests."""

from __future__ import annotations

import asyncio
import sys
import time
import types
from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer

from prunefusion.server.config import VllmModelConfig
from prunefusion.server.engines import vllm_engine
from prunefusion.server.engines.base import FinishReason, GenerationRequest, SamplingParams, collect
from prunefusion.server.engines.book import RequestBook
from prunefusion.server.engines.vllm_engine import VllmEngine

TOKEN = 100  # an ordinary token of the pico vocabulary


class ScriptedLLM:
    """Like vLLM's AsyncLLM: a request id becomes known only after an await (an abort before that is lost), then
    one token per step; an abort of a known id ends its stream with an 'abort' output."""

    def __init__(self, register_after_s: float = 0.05, step_s: float = 0.005, hang: bool = False):
        self.register_after_s, self.step_s, self.hang = register_after_s, step_s, hang
        self.known: set[str] = set()
        self.aborting: set[str] = set()
        self.abort_calls: list[str] = []
        self.errored = False

    async def generate(self, prompt, params, request_id):
        await asyncio.sleep(self.register_after_s)
        self.known.add(request_id)
        try:
            if self.hang:
                await asyncio.Event().wait()
            for i in range(params.kwargs["max_tokens"]):
                await asyncio.sleep(self.step_s)
                if request_id in self.aborting:
                    yield output([], True, "abort")
                    return
                last = i == params.kwargs["max_tokens"] - 1
                yield output([TOKEN], last, "length" if last else None)
        finally:
            self.known.discard(request_id)

    async def abort(self, request_id):
        self.abort_calls.append(request_id)
        if request_id in self.known:
            self.aborting.add(request_id)

    def shutdown(self):
        pass


def output(ids, finished, reason):
    return SimpleNamespace(outputs=[SimpleNamespace(token_ids=ids, finish_reason=reason)], finished=finished)


@pytest.fixture()
def fake_vllm(monkeypatch):
    """The few names the adapter imports per request, so that no real vLLM is needed."""
    root = types.ModuleType("vllm")
    root.TokensPrompt = lambda prompt_token_ids: {"prompt_token_ids": prompt_token_ids}
    root.SamplingParams = lambda **kwargs: SimpleNamespace(kwargs=kwargs)
    sampling = types.ModuleType("vllm.sampling_params")
    sampling.RequestOutputKind = SimpleNamespace(DELTA="delta")
    monkeypatch.setitem(sys.modules, "vllm", root)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", sampling)


def engine_on(llm: ScriptedLLM, pico_dir) -> VllmEngine:
    engine = VllmEngine(VllmModelConfig(name="fake", path=str(pico_dir), engine="vllm", max_batch_size=4, max_queue=4))
    tokenizer = AutoTokenizer.from_pretrained(pico_dir)
    checkpoint = SimpleNamespace(tokenizer=tokenizer, eos_token_ids=frozenset({tokenizer.eos_token_id}),
                                 context_length=256, max_token_chars=32)
    engine._llm = llm
    engine.book = RequestBook("fake", checkpoint, max_running=4, max_queue=4, max_new_tokens_limit=200)
    engine._accepting = True
    return engine


def request(rid: str, n: int = 100, deadline: float | None = None) -> GenerationRequest:
    r = GenerationRequest(rid, "The os module", SamplingParams(max_new_tokens=n))
    r.deadline = deadline
    return r


async def test_a_stream_runs_to_its_length(fake_vllm, pico_dir):
    engine = engine_on(ScriptedLLM(), pico_dir)
    result = await collect(engine.generate(request("a", 5)))
    assert result.finish_reason is FinishReason.LENGTH and result.token_ids == (TOKEN,) * 5
    assert not len(engine.book) and engine.finished[FinishReason.LENGTH] == 1


async def test_an_abort_before_vllm_knows_the_request_still_ends_it(fake_vllm, pico_dir):
    llm = ScriptedLLM(register_after_s=0.05)
    engine = engine_on(llm, pico_dir)
    task = asyncio.create_task(collect(engine.generate(request("a"))))
    await asyncio.sleep(0.01)  # admitted, not yet registered in vLLM: the abort a shutdown sends is lost there
    await engine.shutdown()
    result = await task
    assert result.finish_reason is FinishReason.CANCELLED
    assert result.usage.completion_tokens <= 1  # ended at the first output, not after 100 tokens
    assert not len(engine.book) and not llm.known
    assert len(llm.abort_calls) >= 2  # the lost one, and the one sent when the stream was closed


async def test_a_deadline_already_past_ends_the_request_as_deadline(fake_vllm, pico_dir):
    engine = engine_on(ScriptedLLM(), pico_dir)
    result = await collect(engine.generate(request("a", deadline=time.monotonic() - 1)))
    assert result.finish_reason is FinishReason.DEADLINE and result.usage.completion_tokens <= 1
    assert engine.finished[FinishReason.DEADLINE] == 1


async def test_shutdown_ends_a_stream_that_never_answers(fake_vllm, pico_dir, monkeypatch):
    monkeypatch.setattr(vllm_engine, "SHUTDOWN_DRAIN_SECONDS", 0.2)
    engine = engine_on(ScriptedLLM(hang=True), pico_dir)
    task = asyncio.create_task(collect(engine.generate(request("a"))))
    await asyncio.sleep(0.1)
    async with asyncio.timeout(10):
        await engine.shutdown()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not len(engine.book) and engine.finished[FinishReason.CANCELLED] == 1
