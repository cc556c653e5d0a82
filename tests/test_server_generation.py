"""Text generation through a real gRPC server socket, checked against transformers' own generate; every test runs
against each engine (torch; vllm where vLLM is installed)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prunefusion.server.engines.base import FinishReason
from prunefusion_client import GenerateOptions
from prunefusion_client.v1 import text_generation_pb2 as pb

ENGINES = ["torch", pytest.param("vllm", marks=pytest.mark.vllm)]
pytestmark = pytest.mark.parametrize("server", ENGINES, indirect=True)

# its greedy output runs to 200 tokens on both engines' pico models (no early EOS): long requests for the
# cancellation, deadline and overload tests
LONG_PROMPT = "The with statement"

PROMPTS = [
    "The os module",
    "Lists are mutable sequences, typically used to store collections of homogeneous items",
    "x",
    "def f(): return 1 + 2 * 3 and some more words to make a longer prompt than the others in this list",
    "Raised when",
    "The with statement",
]


@pytest.fixture()
def served_dir(server):
    return server.engine("pico").info.path


@pytest.fixture()
def hf(served_dir):
    return AutoTokenizer.from_pretrained(served_dir), AutoModelForCausalLM.from_pretrained(served_dir).eval()


def hf_greedy(hf, prompt: str, max_new_tokens: int) -> list[int]:
    """The slow, obvious reference: transformers' generate, greedy, batch of one, stopping at EOS."""
    tokenizer, model = hf
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def test_greedy_matches_transformers_generate(client, hf):
    for prompt in PROMPTS:
        response = client.generate(prompt, "pico", GenerateOptions(max_new_tokens=40))
        assert list(response.token_ids) == hf_greedy(hf, prompt, 40), prompt
        assert response.usage.completion_tokens == len(response.token_ids)
        assert response.usage.prompt_tokens == len(hf[0](prompt).input_ids)
        assert response.text == hf[0].decode(response.token_ids, skip_special_tokens=True)
        expected = pb.FINISH_REASON_EOS if response.token_ids[-1] == hf[0].eos_token_id else pb.FINISH_REASON_LENGTH
        assert response.finish_reason == expected


def _run_concurrently(client, jobs):
    with ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(lambda job: client.generate(*job), jobs))


def test_concurrent_requests_equal_their_sequential_runs(client, server):
    jobs = [(p, "pico", GenerateOptions(max_new_tokens=10 + 7 * i)) for i, p in enumerate(PROMPTS)]
    jobs += [(p, "pico", GenerateOptions(max_new_tokens=30, temperature=0.8, top_k=40, top_p=0.9, seed=i))
             for i, p in enumerate(PROMPTS)]
    sequential = [client.generate(p, "pico-one", o) for p, _, o in jobs]  # one slot: every request runs alone
    engine = server.engine("pico")
    engine.peak_batch = 0  # counted by the torch engine; vLLM batches inside its engine-core process
    concurrent = _run_concurrently(client, jobs)
    if engine.kind == "torch":
        assert engine.peak_batch > 1, "requests were not batched together"
    for alone, together in zip(sequential, concurrent, strict=True):
        assert list(together.token_ids) == list(alone.token_ids)
        assert together.text == alone.text


def test_seed_reproducible_and_seed_sensitive(client):
    def sample(seed):
        opts = GenerateOptions(max_new_tokens=40, temperature=1.0, top_p=0.95, seed=seed)
        return list(client.generate("The os module", "pico", opts).token_ids)

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_stop_sequence_cuts_text_and_is_never_streamed(client):
    # a prompt whose greedy output runs long enough to hold a stop sequence (random pico weights: some end at once)
    prompt, full = next((p, t) for p in PROMPTS
                        if len(t := client.generate(p, "pico", GenerateOptions(max_new_tokens=60)).text) >= 30)
    stop = full[20:24]
    assert stop and stop in full
    expected = full[: full.index(stop)]
    response = client.generate(prompt, "pico", GenerateOptions(max_new_tokens=60, stop=[stop]))
    assert response.finish_reason == pb.FINISH_REASON_STOP
    assert response.text == expected
    chunks = list(client.generate_stream(prompt, "pico", GenerateOptions(max_new_tokens=60, stop=[stop])))
    assert "".join(c.text for c in chunks) == expected
    assert chunks[-1].finish_reason == pb.FINISH_REASON_STOP


@pytest.mark.parametrize("options", [GenerateOptions(max_new_tokens=50),
                                     GenerateOptions(max_new_tokens=50, temperature=0.9, top_k=30, seed=3)])
def test_stream_equals_unary(client, options):
    for prompt in PROMPTS[:3]:
        unary = client.generate(prompt, "pico", options)
        chunks = list(client.generate_stream(prompt, "pico", options))
        assert len(chunks) > 1
        assert "".join(c.text for c in chunks) == unary.text
        assert [t for c in chunks for t in c.token_ids] == list(unary.token_ids)
        assert all(c.finish_reason == pb.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])
        last = chunks[-1]
        assert last.finish_reason == unary.finish_reason
        assert last.usage == unary.usage
        assert 0 < last.timings.time_to_first_token_seconds <= last.timings.total_seconds


def _busy(engine) -> bool:
    """Requests in the engine; for vLLM also those vLLM itself still runs (the adapter's count could hide a leak)."""
    stats = engine.stats()
    in_vllm = engine._llm.get_num_unfinished_requests() if engine.kind == "vllm" else 0
    return bool(stats.running or stats.waiting or in_vllm)


def _wait_idle(engine, timeout=5.0) -> None:
    end = time.monotonic() + timeout
    while _busy(engine):
        assert time.monotonic() < end, f"engine not idle: {engine.stats()}"
        time.sleep(0.005)


def test_client_cancel_frees_the_slot(client, server):
    engine = server.engine("pico-one")
    _wait_idle(engine)
    before = engine.finished[FinishReason.CANCELLED]
    stream = client.generate_stream(LONG_PROMPT, "pico-one", GenerateOptions(max_new_tokens=200))
    first = next(stream)
    assert first.token_ids
    stream.close()  # cancels the RPC
    _wait_idle(engine)
    assert engine.finished[FinishReason.CANCELLED] == before + 1
    # the single slot serves the next request at once (had the cancelled one gone on, 190+ tokens were ahead of it)
    response = client.generate("x", "pico-one", GenerateOptions(max_new_tokens=5))
    assert response.usage.completion_tokens == 5
    assert response.timings.time_to_first_token_seconds < 0.5


def test_deadline_ends_the_call_and_frees_the_slot(client, server):
    engine = server.engine("pico-one")
    _wait_idle(engine)
    before = engine.finished[FinishReason.DEADLINE]
    with pytest.raises(grpc.RpcError) as err:
        client.generate(LONG_PROMPT, "pico-one", GenerateOptions(max_new_tokens=200), timeout=0.1)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _wait_idle(engine)
    assert engine.finished[FinishReason.DEADLINE] == before + 1


def test_overload_answers_resource_exhausted(client, server):
    engine = server.engine("pico-one")  # 1 slot + 1 queue place
    _wait_idle(engine)
    codes = []

    def call(_):
        try:
            client.generate(LONG_PROMPT, "pico-one", GenerateOptions(max_new_tokens=200))
            return grpc.StatusCode.OK, ()
        except grpc.RpcError as e:
            return e.code(), e.trailing_metadata()

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, range(8)))
    codes = [c for c, _ in results]
    assert codes.count(grpc.StatusCode.OK) >= 2
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 1
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    pushback = [dict(md) for c, md in results if c == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert all("grpc-retry-pushback-ms" in md for md in pushback)


BAD_INPUTS = [
    (dict(prompt=""), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    (dict(max_new_tokens=0), grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens"),
    (dict(max_new_tokens=-3), grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens"),
    (dict(max_new_tokens=201), grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens"),
    (dict(temperature=-0.1), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    (dict(temperature=2.5), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    (dict(top_p=0.0), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    (dict(top_p=1.5), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    (dict(top_k=-1), grpc.StatusCode.INVALID_ARGUMENT, "top_k"),
    (dict(stop=[""]), grpc.StatusCode.INVALID_ARGUMENT, "stop"),
    (dict(prompt="word " * 400), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    (dict(prompt="x" * 500_000), grpc.StatusCode.INVALID_ARGUMENT, "characters"),  # refused before tokenizing
    (dict(prompt="x" * 2_000_000), grpc.StatusCode.INVALID_ARGUMENT, "at most 1048576"),  # the guard: before parsing
    (dict(prompt="word " * 30, max_new_tokens=200), grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens"),
    (dict(model="no-such-model"), grpc.StatusCode.NOT_FOUND, "no-such-model"),
]


@pytest.mark.parametrize(("fields", "code", "named"), BAD_INPUTS, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD_INPUTS)])
def test_bad_input_is_rejected_naming_the_field(server, fields, code, named):
    from prunefusion_client.v1 import text_generation_pb2_grpc as pb_grpc

    request = pb.GenerateRequest(**{"model": "pico", "prompt": "hello", **fields})
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.TextGenerationStub(channel)
        for call in (stub.Generate, lambda r, **kw: list(stub.GenerateStream(r, **kw))):
            with pytest.raises(grpc.RpcError) as err:
                call(request, timeout=30)
            assert err.value.code() == code
            assert named in err.value.details()


def test_list_models(client, hf, served_dir, server, request):
    from pathlib import Path

    from prunefusion.checkpoints import digest_files

    models = {m.name: m for m in client.list_models()}
    assert list(models) == ["pico", "pico-one"]
    m = models["pico"]
    assert m.family == "llama"
    assert m.num_layers == 2
    assert m.num_parameters == sum(p.numel() for p in hf[1].parameters())
    assert m.weights_digest == digest_files(sorted(Path(served_dir).glob("*.safetensors")))
    assert m.engine == request.node.callspec.params["server"]
    assert m.context_length == 256
    assert m.max_new_tokens_limit == 200


def test_empty_model_name_means_the_first_model(client):
    response = client.generate("The os module", "", GenerateOptions(max_new_tokens=3))
    assert response.model == "pico"


def break_model(engine, monkeypatch) -> None:
    """Make every model run of `engine` fail with 'simulated device failure'."""
    def fail(*args, **kwargs):
        raise RuntimeError("simulated device failure")

    if engine.kind == "torch":
        # every pass of either decode path (prefill, prefill chunk, decode step) embeds its tokens first
        monkeypatch.setattr(engine._loaded.model.get_input_embeddings(), "forward", fail)
    else:  # vLLM runs the model in its engine-core process: fail the request stream it hands back
        async def failing_stream(*args, **kwargs):
            fail()
            yield

        monkeypatch.setattr(engine._llm, "generate", failing_stream)


def test_model_failure_maps_to_internal_and_the_server_keeps_serving(client, server, monkeypatch):
    with monkeypatch.context() as patch:
        break_model(server.engine("pico"), patch)
        with pytest.raises(grpc.RpcError) as err:
            client.generate("The os module", "pico", GenerateOptions(max_new_tokens=3))
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert "simulated" not in err.value.details()  # internals stay in the server log
    assert client.generate("The os module", "pico", GenerateOptions(max_new_tokens=3)).usage.completion_tokens == 3
