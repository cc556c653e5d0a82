"""The response cache against a real Redis: hits, keys, policies, TTL, fail-open, single-flight, metrics."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
import urllib.request

import pytest
from conftest import ServerThread
from prometheus_client import REGISTRY

from prunefusion.server.cache.backend import connect
from prunefusion.server.cache.keys import cache_key, is_deterministic
from prunefusion.server.cache.service import CachedEngine, CacheSettings, ResponseCache
from prunefusion.server.config import TorchModelConfig, parse_config
from prunefusion.server.engines.base import CachePolicy, GenerationRequest, ModelInfo, SamplingParams
from prunefusion.server.engines.torch_engine import TorchEngine
from prunefusion_client import Client, GenerateOptions


def runs(model: str) -> float:
    return REGISTRY.get_sample_value("prunefusion_model_runs_total", {"model": model}) or 0.0


def cache_config(redis_url: str, **cache) -> dict:
    return {"enabled": True, "url": redis_url, "timeout_ms": 200, "backoff_initial_seconds": 0.2,
            "backoff_max_seconds": 0.5, **cache}


@pytest.fixture()
def cached_server(pico_dir, redis_server):
    config = parse_config({
        "server": {"host": "127.0.0.1", "port": 0, "metrics_port": 0, "http_port": None},
        "cache": cache_config(redis_server.url),
        "models": [{"name": "cached-pico", "path": str(pico_dir), "max_batch_size": 8}],
    })
    server = ServerThread(config).start()
    yield server
    server.stop()


# ---- keys (pure) ----------------------------------------------------------------------------------------------
INFO = ModelInfo(name="m", family="llama", num_layers=2, num_parameters=1, weights_digest="w" * 64, engine="torch",
                 context_length=256, max_new_tokens_limit=100, default_max_new_tokens=10, path="/m",
                 tokenizer_digest="t" * 64, config_digest="g" * 64, device="cpu", dtype="float32")
PARAMS = SamplingParams(max_new_tokens=10, temperature=0.7, top_p=0.9, top_k=5, seed=1, stop=("x",))


def test_key_changes_with_every_input_and_only_then():
    base = cache_key("generate", INFO, "hi", PARAMS)
    assert base == cache_key("generate", dataclasses.replace(INFO, path="/elsewhere"), "hi", PARAMS)
    variants = [cache_key("caption", INFO, "hi", PARAMS), cache_key("generate", INFO, "hi!", PARAMS)]
    variants += [cache_key("generate", dataclasses.replace(INFO, **{f: v}), "hi", PARAMS) for f, v in
                 (("name", "m2"), ("weights_digest", "v" * 64), ("tokenizer_digest", "u" * 64),
                  ("config_digest", "c" * 64), ("engine", "vllm"), ("device", "cuda"), ("dtype", "bfloat16"),
                  ("context_length", 128), ("max_new_tokens_limit", 50))]
    variants += [cache_key("generate", INFO, "hi", dataclasses.replace(PARAMS, **{f: v})) for f, v in
                 (("max_new_tokens", 11), ("temperature", 0.8), ("top_p", 0.8), ("top_k", 6), ("seed", 2),
                  ("stop", ("y",)), ("stop", ("x", "y")), ("presence_penalty", 0.1), ("frequency_penalty", 0.1),
                  ("repetition_penalty", 1.1), ("min_new_tokens", 2), ("ignore_eos", True))]
    variants.append(cache_key("generate", INFO, "", PARAMS, (1, 2, 3)))
    variants.append(cache_key("generate", INFO, "", PARAMS, (1, 2, 4)))
    assert len({base, *variants}) == len(variants) + 1


def test_only_deterministic_requests_are_cacheable():
    assert is_deterministic(SamplingParams(5))
    assert is_deterministic(SamplingParams(5, temperature=1.0, seed=3))
    assert not is_deterministic(SamplingParams(5, temperature=1.0))
    assert not is_deterministic(SamplingParams(5, logprobs=2))  # an entry holds no logprobs


# ---- through the server ---------------------------------------------------------------------------------------
def test_hit_after_miss_and_stream_replay(cached_server):
    with Client(cached_server.target, max_attempts=1) as client:
        opts = GenerateOptions(max_new_tokens=30)
        before = runs("cached-pico")
        first = client.generate("The os module", "cached-pico", opts)
        second = client.generate("The os module", "cached-pico", opts)
        assert (first.cached, second.cached) == (False, True)
        assert runs("cached-pico") == before + 1
        assert (second.text, list(second.token_ids), second.usage) == (first.text, list(first.token_ids), first.usage)
        assert second.finish_reason == first.finish_reason
        live = list(client.generate_stream("The os module", "cached-pico",
                                           GenerateOptions(max_new_tokens=30, cache_policy="bypass")))
        replay = list(client.generate_stream("The os module", "cached-pico", opts))
        assert all(c.cached for c in replay) and not any(c.cached for c in live)
        assert [c.text for c in replay] == [c.text for c in live]  # the stored stream, chunk for chunk
        assert "".join(c.text for c in replay) == first.text
        assert replay[-1].finish_reason == first.finish_reason
        # a different parameter is a different entry
        other = client.generate("The os module", "cached-pico", GenerateOptions(max_new_tokens=29))
        assert not other.cached


def test_sampling_without_seed_is_never_cached(cached_server):
    with Client(cached_server.target, max_attempts=1) as client:
        before = runs("cached-pico")
        for _ in range(2):
            r = client.generate("x", "cached-pico", GenerateOptions(max_new_tokens=5, temperature=1.0))
            assert not r.cached
        assert runs("cached-pico") == before + 2
        seeded = [client.generate("x", "cached-pico", GenerateOptions(max_new_tokens=5, temperature=1.0, seed=4))
                  for _ in range(2)]
        assert [r.cached for r in seeded] == [False, True]


def test_policies(cached_server):
    with Client(cached_server.target, max_attempts=1) as client:
        def call(policy):
            return client.generate("Raised when", "cached-pico", GenerateOptions(max_new_tokens=8,
                                                                                 cache_policy=policy))

        assert not call("bypass").cached
        assert not call("default").cached  # bypass stored nothing
        assert call("default").cached
        before = runs("cached-pico")
        assert not call("refresh").cached
        assert runs("cached-pico") == before + 1
        assert call("default").cached


def test_identical_concurrent_requests_run_the_model_once(cached_server):
    async def burst():
        from prunefusion_client import AsyncClient

        async with AsyncClient(cached_server.target, max_attempts=1) as client:
            opts = GenerateOptions(max_new_tokens=60)
            return await asyncio.gather(*(client.generate("The with statement", "cached-pico", opts)
                                          for _ in range(20)))

    before = runs("cached-pico")
    responses = asyncio.run(burst())
    assert runs("cached-pico") == before + 1
    assert len({r.text for r in responses}) == 1
    assert sum(not r.cached for r in responses) == 1


def test_redis_down_fails_open_and_hits_resume(cached_server, redis_server):
    errors = lambda: sum(REGISTRY.get_sample_value("prunefusion_cache_errors_total", {"operation": op}) or 0  # noqa: E731
                         for op in ("get", "set", "lock", "unlock"))
    with Client(cached_server.target, max_attempts=1) as client:
        opts = GenerateOptions(max_new_tokens=10)
        first = client.generate("Return a new", "cached-pico", opts)
        assert client.generate("Return a new", "cached-pico", opts).cached
        redis_server.kill()
        errors_before = errors()
        for _ in range(3):
            r = client.generate("Return a new", "cached-pico", opts)
            assert not r.cached and list(r.token_ids) == list(first.token_ids)
        assert errors() > errors_before
        redis_server.start()  # same port, empty
        time.sleep(0.6)  # longer than the maximum back-off
        deadline = time.monotonic() + 10
        while not client.generate("Return a new", "cached-pico", opts).cached:
            assert time.monotonic() < deadline, "cache hits did not resume"
            time.sleep(0.1)


def test_metrics_endpoint_shows_cache_and_engine_metrics(cached_server):
    def value(name, **labels):
        return REGISTRY.get_sample_value(name, labels) or 0.0

    names = [("prunefusion_cache_lookups_total", {"result": "hit"}),
             ("prunefusion_cache_lookups_total", {"result": "miss"}),
             ("prunefusion_cache_lookup_seconds_count", {}),
             ("prunefusion_model_runs_total", {"model": "cached-pico"}),
             ("prunefusion_time_to_first_token_seconds_count", {"model": "cached-pico"}),
             ("prunefusion_e2e_request_latency_seconds_count", {"model": "cached-pico"}),
             ("prunefusion_request_queue_time_seconds_count", {"model": "cached-pico"})]
    before = [value(n, **labels) for n, labels in names]
    with Client(cached_server.target, max_attempts=1) as client:
        client.generate("A class that", "cached-pico", GenerateOptions(max_new_tokens=5))
        client.generate("A class that", "cached-pico", GenerateOptions(max_new_tokens=5))
    after = [value(n, **labels) for n, labels in names]
    # one miss that ran the model (and its latencies), one hit that did not; three Redis GETs: the miss, the
    # runner's re-check after taking the lock (another process may have just stored it), the hit
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1, 3, 1, 1, 1, 1]
    text = urllib.request.urlopen(f"http://127.0.0.1:{cached_server.server.metrics_port}/metrics").read().decode()
    for name in ('prunefusion_cache_lookups_total{result="hit"}', "prunefusion_inter_token_latency_seconds_bucket",
                 "prunefusion_batch_size_bucket", 'prunefusion_model_runs_total{model="cached-pico"}'):
        assert name in text, name


# ---- the cache in-process, against the same Redis ---------------------------------------------------------------
@pytest.fixture()
async def engine(pico_dir):
    e = TorchEngine(TorchModelConfig(name="inproc-pico", path=str(pico_dir)))
    await e.start()
    yield e
    await e.shutdown()


async def consume(cache, engine, rid, policy=CachePolicy.DEFAULT, max_new_tokens_override=8, **params):
    """(chunk, cached) of each chunk of one request through the cache wrapper."""
    request = GenerationRequest(rid, "The os module", SamplingParams(max_new_tokens=max_new_tokens_override, **params),
                                cache=policy)
    return [(chunk, chunk.cached) async for chunk in CachedEngine(engine, cache).generate(request)]


async def test_ttl_expiry_and_jitter(engine, redis_server):
    backend = connect(redis_server.url, None, timeout_s=2.0, backoff_initial_s=0.1, backoff_max_s=0.2)
    cache = ResponseCache(backend, CacheSettings(namespace="ttl-test", ttl_seconds=0.4, ttl_jitter=0.5))
    try:
        assert not (await consume(cache, engine, "a"))[-1][1]
        assert (await consume(cache, engine, "b"))[-1][1]
        import redis

        client = redis.Redis.from_url(redis_server.url)
        [key] = [k for k in client.keys("ttl-test:*") if not k.endswith(b":lock")]
        assert 0 < client.pttl(key) <= 600  # ttl * (1 + jitter) at most
        time.sleep(0.65)
        assert not (await consume(cache, engine, "c"))[-1][1]
    finally:
        await cache.close()
    # jitter: entries written together expire apart (uniform over 60..90 s here; long enough not to expire
    # while a loaded machine writes them)
    backend = connect(redis_server.url, None, timeout_s=2.0, backoff_initial_s=0.1, backoff_max_s=0.2)
    cache = ResponseCache(backend, CacheSettings(namespace="jitter-test", ttl_seconds=60, ttl_jitter=0.5))
    try:
        for n in range(6):
            items = await consume(cache, engine, f"j{n}", max_new_tokens_override=n + 1)
            assert not items[-1][1]  # a miss, now stored
        ttls = [client.pttl(k) for k in client.keys("jitter-test:*") if not k.endswith(b":lock")]
        assert len(ttls) == 6 and max(ttls) - min(ttls) > 1000 and min(ttls) > 55_000 and max(ttls) <= 90_000
    finally:
        await cache.close()


async def test_oversized_results_are_not_stored(engine, redis_server):
    backend = connect(redis_server.url, None, timeout_s=0.2, backoff_initial_s=0.1, backoff_max_s=0.2)
    cache = ResponseCache(backend, CacheSettings(namespace="small", max_entry_bytes=10))
    try:
        assert not (await consume(cache, engine, "a"))[-1][1]
        assert not (await consume(cache, engine, "b"))[-1][1]
    finally:
        await cache.close()


async def test_embedded_redis_starts_and_stops_with_the_cache(engine, tmp_path):
    backend = connect(None, tmp_path / "redis", timeout_s=0.5, backoff_initial_s=0.1, backoff_max_s=0.2)
    cache = ResponseCache(backend, CacheSettings(namespace="embedded"))
    assert not (await consume(cache, engine, "a"))[-1][1]
    assert (await consume(cache, engine, "b"))[-1][1]
    pid = backend.embedded_pid
    os.kill(pid, 0)  # running
    await cache.close()
    deadline = time.monotonic() + 10
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, "embedded redis-server still running after close"
        await asyncio.sleep(0.05)
    assert (tmp_path / "redis" / "redis.db").is_file()  # its data stays under the data directory


def test_slow_redis_is_skipped_within_the_timeout(cached_server, redis_server):
    import threading

    import redis

    with Client(cached_server.target, max_attempts=1) as client:
        opts = GenerateOptions(max_new_tokens=6)
        first = client.generate("Open a file", "cached-pico", opts)
        # block the Redis server for 2 s (DEBUG SLEEP), far beyond the 200 ms operation timeout
        sleeper = threading.Thread(target=lambda: redis.Redis.from_url(redis_server.url).execute_command(
            "DEBUG", "SLEEP", "2"))
        sleeper.start()
        time.sleep(0.1)
        start = time.monotonic()
        response = client.generate("Open a file", "cached-pico", opts)
        elapsed = time.monotonic() - start
        sleeper.join()
    assert not response.cached and list(response.token_ids) == list(first.token_ids)
    assert elapsed < 1.0  # served by the model after one timed-out lookup, not after Redis woke up


def test_a_generate_request_crosses_at_most_four_async_generators(cached_server, monkeypatch):
    """guard -> servicer -> CachedEngine -> engine: the async generators on the stack when the engine admits a
    request (a streamed miss, a unary miss, a bypass), innermost first."""
    import inspect
    import sys

    engine = cached_server.engine("cached-pico")
    chains: list[list[str]] = []
    admit = engine.book.admit

    def recording_admit(*args, **kwargs):
        frame, names = sys._getframe(1), []
        while frame is not None:
            if frame.f_code.co_flags & inspect.CO_ASYNC_GENERATOR:
                names.append(frame.f_code.co_qualname)
            frame = frame.f_back
        chains.append(names)
        return admit(*args, **kwargs)

    monkeypatch.setattr(engine.book, "admit", recording_admit)
    with Client(cached_server.target, max_attempts=1) as client:
        list(client.generate_stream("Three hops, streamed", "cached-pico", GenerateOptions(max_new_tokens=4)))
        client.generate("Three hops, unary", "cached-pico", GenerateOptions(max_new_tokens=4))
        client.generate("Three hops, bypass", "cached-pico", GenerateOptions(max_new_tokens=4, cache_policy="bypass"))
    streamed, unary, bypass = chains
    assert streamed == ["TorchEngine.generate", "CachedEngine._through_cache", "TextGenerationServicer.GenerateStream",
                        "RequestGuard._guarded.<locals>.relaying.<locals>.streamed"]  # the guard's one relay
    assert unary == ["TorchEngine.generate", "CachedEngine._through_cache"]  # Generate folds with `collect`
    assert bypass == ["TorchEngine.generate"]  # an uncached request goes to the engine's own stream


async def test_a_request_the_model_refuses_is_never_served_from_the_cache(engine, pico_dir, redis_server):
    """The cache does not validate; the engine does. An entry stored under one limit does not answer a model whose
    lower limit refuses the request, and an invalid request is refused by the engine and stores nothing."""
    from prunefusion.server.engines.base import InvalidRequestError

    backend = connect(redis_server.url, None, timeout_s=2.0, backoff_initial_s=0.1, backoff_max_s=0.2)
    cache = ResponseCache(backend, CacheSettings(namespace="limits"))
    strict = TorchEngine(TorchModelConfig(name="inproc-pico", path=str(pico_dir), max_new_tokens_limit=20,
                                          default_max_new_tokens=8))
    await strict.start()
    try:
        assert not (await consume(cache, engine, "a", max_new_tokens_override=30))[-1][1]
        assert (await consume(cache, engine, "b", max_new_tokens_override=30))[-1][1]  # stored under limit 512
        with pytest.raises(InvalidRequestError, match="max_new_tokens"):  # same name and weights, limit 20
            await consume(cache, strict, "c", max_new_tokens_override=30)
        with pytest.raises(InvalidRequestError, match="top_p"):
            await consume(cache, engine, "d", top_p=0.0)
        with pytest.raises(InvalidRequestError, match="top_p"):  # refused again: nothing was stored for it
            await consume(cache, engine, "e", top_p=0.0)
    finally:
        await strict.shutdown()
        await cache.close()
