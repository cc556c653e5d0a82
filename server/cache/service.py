"""The response cache as an engine wrapper: `CachedEngine(engine, cache)` has the text engine interface itself, so
every front end gets caching, single-flight and replay by asking the registry for a model.

- Only deterministic requests are cached (greedy, or sampled with a seed; keys.py); others go straight to the
  engine (the wrapper returns the engine's own stream: no extra hop).
- Single-flight: identical concurrent requests in one process share one model run (one future per key); across
  processes a Redis lock (redis-py's `Lock`) elects one runner while the others poll for its entry.
- An entry stores the stream's chunks, so a hit replays as the same stream, every chunk marked `cached`; a unary
  caller (`request.stream` False) gets it as one chunk.
- Fail-open: with Redis down or slow, requests run uncached (backend.py); nothing here raises because of Redis.
- Requests are not validated here: the engine does that, once. An invalid request cannot hit: entries exist only
  for requests that ran, and the key holds every input of the checks, the model's limits included (keys.py); on
  a miss the engine refuses it before any model work (it then costs one Redis lookup and one lock, like a miss).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from prunefusion.server.cache.backend import UNAVAILABLE, RedisBackend
from prunefusion.server.cache.keys import cache_key, is_deterministic
from prunefusion.server.engines.base import (
    CachePolicy,
    CacheSource,
    Engine,
    EngineStats,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    Timings,
    Usage,
)
from prunefusion.server.metrics import CACHE_ERRORS, CACHE_LOOKUPS, CACHE_SKIPPED, CACHE_STORES

log = logging.getLogger(__name__)

CACHEABLE_FINISHES = {FinishReason.LENGTH, FinishReason.STOP, FinishReason.EOS}
POLL_SECONDS = 0.005
MAX_POLL_SECONDS = 0.05


@dataclass(frozen=True)
class CacheSettings:
    namespace: str = "prunefusion"
    ttl_seconds: float = 86400.0
    ttl_jitter: float = 0.1  # each entry lives ttl * (1 + U(0, jitter)): entries written together expire apart
    max_entry_bytes: int = 1 << 20
    lock_ttl_seconds: float = 30.0  # how long another process waits for the runner before running itself


@dataclass(frozen=True)
class CachedResult:
    chunks: tuple[tuple[str, tuple[int, ...]], ...]  # (text delta, token ids) as first streamed
    finish_reason: FinishReason
    usage: Usage

    def to_bytes(self) -> bytes:
        return json.dumps({"chunks": self.chunks, "finish": self.finish_reason.value,
                           "usage": [self.usage.prompt_tokens, self.usage.completion_tokens]},
                          separators=(",", ":"), ensure_ascii=False).encode()

    @classmethod
    def from_bytes(cls, blob: bytes) -> CachedResult:
        data = json.loads(blob)
        return cls(tuple((text, tuple(ids)) for text, ids in data["chunks"]), FinishReason(data["finish"]),
                   Usage(*data["usage"]))

    @classmethod
    def from_chunks(cls, chunks: list[GenerationChunk]) -> CachedResult | None:
        last = chunks[-1] if chunks else None
        if last is None or last.finish_reason not in CACHEABLE_FINISHES:
            return None
        return cls(tuple((c.text, c.token_ids) for c in chunks), last.finish_reason, last.usage)

    def replay(self, request_id: str, started: float, source: CacheSource, whole: bool = False
               ) -> list[GenerationChunk]:
        """The stored stream, chunk for chunk, marked with its source; `whole`: one final chunk holding it all."""
        elapsed = time.monotonic() - started
        timings = Timings(queue_seconds=0.0, time_to_first_token_seconds=elapsed, total_seconds=elapsed)
        if whole:
            text, ids = "".join(t for t, _ in self.chunks), tuple(i for _, c in self.chunks for i in c)
            return [GenerationChunk(request_id, text, ids, self.finish_reason, self.usage, timings, source)]
        *body, (last_text, last_ids) = self.chunks
        return [GenerationChunk(request_id, text, ids, cache_source=source) for text, ids in body] + [
            GenerationChunk(request_id, last_text, last_ids, self.finish_reason, self.usage, timings, source)]


class ResponseCache:
    """The store every CachedEngine of a server shares: Redis entries, the cross-process lock, and the in-process
    single-flight table. With no backend (cache disabled) nothing is cached."""

    def __init__(self, backend: RedisBackend | None, settings: CacheSettings = CacheSettings()):
        self.backend = backend
        self.settings = settings
        self.inflight: dict[str, asyncio.Future[CachedResult | None]] = {}
        self._background: set[asyncio.Task] = set()  # lock releases in flight (asyncio keeps only weak references)

    async def close(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self.backend is not None:
            await self.backend.close()

    async def lookup(self, key: str) -> CachedResult | None:
        blob = await self.backend.get(key)
        found = _decode(blob) if blob else None
        CACHE_LOOKUPS.labels("hit" if found else "unavailable" if blob is UNAVAILABLE else "miss").inc()
        return found

    async def elect(self, key: str):
        """Across processes: (lock, None) if we hold the lock and run; (None, result) if another process's run
        produced the entry; (None, None) if Redis is unavailable or the other runner timed out: run uncoordinated."""
        poll = POLL_SECONDS
        deadline = time.monotonic() + self.settings.lock_ttl_seconds
        while time.monotonic() < deadline:
            lock = await self.backend.try_lock(f"{key}:lock", self.settings.lock_ttl_seconds)
            if lock is UNAVAILABLE:
                return None, None
            if lock is not None:
                blob = await self.backend.get(key)  # the previous holder may have stored it just before releasing
                return lock, (_decode(blob) if blob else None)
            blob = await self.backend.get(key)
            if blob is UNAVAILABLE:
                return None, None
            if blob is not None and (found := _decode(blob)) is not None:
                return None, found
            await asyncio.sleep(poll)
            poll = min(poll * 1.5, MAX_POLL_SECONDS)  # the runner may take seconds: do not hammer Redis
        log.warning("cache: waited %.0f s for another process to fill %s; running it here",
                    self.settings.lock_ttl_seconds, key)
        return None, None

    def release_soon(self, lock) -> None:
        """Release in the background: a cancelled handler must not wait on Redis."""
        task = asyncio.ensure_future(self.backend.release_lock(lock))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def store(self, key: str, result: CachedResult | None) -> None:
        if result is None:
            CACHE_SKIPPED.labels("not_finished").inc()
            return
        blob = result.to_bytes()
        if len(blob) > self.settings.max_entry_bytes:
            CACHE_SKIPPED.labels("too_large").inc()
            return
        ttl_ms = int(self.settings.ttl_seconds * (1 + random.uniform(0, self.settings.ttl_jitter)) * 1000)
        if await self.backend.set(key, blob, ttl_ms):
            CACHE_STORES.inc()


class CachedEngine(Engine):
    """A text engine behind the response cache. Lifecycle and stats are the wrapped engine's (`engine`)."""

    def __init__(self, engine: Engine, cache: ResponseCache):
        self.engine = engine
        self.cache = cache
        self.name = engine.name

    @property
    def info(self):
        return self.engine.info

    async def start(self) -> None:
        await self.engine.start()

    async def shutdown(self) -> None:
        await self.engine.shutdown()

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def chat_prompt(self, messages):
        return self.engine.chat_prompt(messages)

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        deterministic = is_deterministic(request.params)
        if self.cache.backend is None or request.cache is CachePolicy.BYPASS or not deterministic:
            CACHE_LOOKUPS.labels("bypass" if deterministic else "uncacheable").inc()
            return self.engine.generate(request)
        return self._through_cache(request)

    async def _through_cache(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        cache, whole = self.cache, not request.stream
        digest = cache_key('generate', self.info, request.prompt, request.params, request.prompt_ids)
        key = f"{cache.settings.namespace}:gen:{digest}"
        started = time.monotonic()
        if request.cache is CachePolicy.DEFAULT:
            found, source = await cache.lookup(key), CacheSource.STORED
            if found is None and key in cache.inflight:  # an identical request is running in this process
                found, source = await asyncio.shield(cache.inflight[key]), CacheSource.SHARED
                if found is not None:
                    CACHE_LOOKUPS.labels("shared").inc()
            if found is not None:
                for chunk in found.replay(request.request_id, started, source, whole):
                    yield chunk
                return
        future: asyncio.Future[CachedResult | None] = asyncio.get_running_loop().create_future()
        cache.inflight.setdefault(key, future)
        lock = None
        try:
            if request.cache is CachePolicy.DEFAULT:
                lock, found = await cache.elect(key)
                if found is not None:  # another process ran it
                    future.set_result(found)
                    CACHE_LOOKUPS.labels("shared").inc()
                    for chunk in found.replay(request.request_id, started, CacheSource.SHARED, whole):
                        yield chunk
                    return
            chunks: list[GenerationChunk] = []
            async with contextlib.aclosing(self.engine.generate(request)) as stream:
                async for chunk in stream:
                    chunks.append(chunk)
                    if chunk.finished:  # store before the last chunk goes out: consumers stop reading after it
                        result = CachedResult.from_chunks(chunks)
                        future.set_result(result)
                        await cache.store(key, result)
                    yield chunk
        finally:
            if not future.done():  # the runner failed or was cancelled: waiters run the model themselves
                future.set_result(None)
            if cache.inflight.get(key) is future:
                del cache.inflight[key]
            if lock is not None:
                cache.release_soon(lock)


def _decode(blob: bytes) -> CachedResult | None:
    """A stored entry, or None (counted as an error) when it is corrupt or not ours: a bad entry is a miss."""
    try:
        return CachedResult.from_bytes(blob)
    except (ValueError, KeyError, TypeError) as err:
        CACHE_ERRORS.labels("decode").inc()
        log.warning("cache: unreadable entry ignored (%s: %s)", type(err).__name__, err)
        return None
