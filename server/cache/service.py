"""The response cache in front of the engines: policy, single-flight, stream replay.

- Only deterministic requests are cached (greedy, or sampled with a seed; keys.py).
- Single-flight: identical concurrent requests in one process share one model run (one future per key); across
  processes a Redis lock (`SET NX PX`) elects one runner while the others poll for its entry.
- An entry stores the stream's chunks, so a hit replays as the same stream, every chunk marked cached.
- Fail-open: with Redis down or slow, requests run uncached (backend.py); nothing here raises because of Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from prunefusion.server.cache.backend import UNAVAILABLE, RedisBackend
from prunefusion.server.cache.keys import cache_key, is_deterministic
from prunefusion.server.engines.base import (
    Engine,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    Timings,
    Usage,
)
from prunefusion.server.engines.validation import check_request
from prunefusion.server.metrics import CACHE_ERRORS, CACHE_LOOKUPS, CACHE_SKIPPED, CACHE_STORES

log = logging.getLogger(__name__)

CACHEABLE_FINISHES = {FinishReason.LENGTH, FinishReason.STOP, FinishReason.EOS}
POLL_SECONDS = 0.005
MAX_POLL_SECONDS = 0.05


class CachePolicy:
    DEFAULT = "default"
    BYPASS = "bypass"
    REFRESH = "refresh"


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

    def replay(self, request_id: str, started: float, whole: bool = False) -> list[GenerationChunk]:
        """The stored stream, chunk for chunk; `whole`: one final chunk holding it all (for unary calls)."""
        elapsed = time.monotonic() - started
        timings = Timings(queue_seconds=0.0, time_to_first_token_seconds=elapsed, total_seconds=elapsed)
        if whole:
            text, ids = "".join(t for t, _ in self.chunks), tuple(i for _, c in self.chunks for i in c)
            return [GenerationChunk(request_id, text, ids, self.finish_reason, self.usage, timings)]
        *body, (last_text, last_ids) = self.chunks
        return [GenerationChunk(request_id, text, ids) for text, ids in body] + [
            GenerationChunk(request_id, last_text, last_ids, self.finish_reason, self.usage, timings)]


class ResponseCache:
    """`generate` yields (chunk, cached) pairs. With no backend (cache disabled) it passes requests straight on."""

    def __init__(self, backend: RedisBackend | None, settings: CacheSettings = CacheSettings()):
        self.backend = backend
        self.settings = settings
        self._inflight: dict[str, asyncio.Future[CachedResult | None]] = {}
        self._background: set[asyncio.Task] = set()  # lock releases in flight (asyncio keeps only weak references)

    async def close(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self.backend is not None:
            await self.backend.close()

    def _ttl_ms(self) -> int:
        return int(self.settings.ttl_seconds * (1 + random.uniform(0, self.settings.ttl_jitter)) * 1000)

    async def generate(self, engine: Engine, request: GenerationRequest, policy: str = CachePolicy.DEFAULT,
                       whole: bool = False) -> AsyncIterator[tuple[GenerationChunk, bool]]:
        """`whole`: the caller only wants the result (unary), so a hit is replayed as one chunk."""
        deterministic = is_deterministic(request.params)
        if self.backend is None or policy == CachePolicy.BYPASS or not deterministic:
            CACHE_LOOKUPS.labels("bypass" if deterministic else "uncacheable").inc()
            async for chunk in _run(engine, request):
                yield chunk, False
            return
        # bad parameters are rejected before any cache work; the prompt's token count needs no check here: an
        # entry exists only for a request that ran, and a miss goes through the engine's full validation
        check_request(request, engine.info.max_new_tokens_limit)
        key = f"{self.settings.namespace}:gen:{cache_key('generate', engine.info, request.prompt, request.params)}"
        started = time.monotonic()
        if policy == CachePolicy.DEFAULT:
            found = await self._lookup(key)
            if found is None and key in self._inflight:  # an identical request is running in this process
                found = await asyncio.shield(self._inflight[key])
                if found is not None:
                    CACHE_LOOKUPS.labels("shared").inc()
            if found is not None:
                for chunk in found.replay(request.request_id, started, whole):
                    yield chunk, True
                return
        leader = self._run_as_leader(engine, request, key, policy, started, whole)
        async with contextlib.aclosing(leader) as items:
            async for item in items:
                yield item

    async def _lookup(self, key: str) -> CachedResult | None:
        blob = await self.backend.get(key)
        found = _decode(blob) if blob else None
        CACHE_LOOKUPS.labels("hit" if found else "unavailable" if blob is UNAVAILABLE else "miss").inc()
        return found

    async def _run_as_leader(self, engine: Engine, request: GenerationRequest, key: str, policy: str,
                             started: float, whole: bool) -> AsyncIterator[tuple[GenerationChunk, bool]]:
        future: asyncio.Future[CachedResult | None] = asyncio.get_running_loop().create_future()
        self._inflight.setdefault(key, future)
        lock_key, token = f"{key}:lock", uuid.uuid4().hex
        holds_lock = False
        try:
            if policy == CachePolicy.DEFAULT:
                holds_lock, found = await self._elect(key, lock_key, token)
                if found is not None:  # another process ran it
                    future.set_result(found)
                    CACHE_LOOKUPS.labels("shared").inc()
                    for chunk in found.replay(request.request_id, started, whole):
                        yield chunk, True
                    return
            chunks: list[GenerationChunk] = []
            async for chunk in _run(engine, request):
                chunks.append(chunk)
                if chunk.finished:  # store before the last chunk goes out: consumers stop reading after it
                    result = CachedResult.from_chunks(chunks)
                    future.set_result(result)
                    await self._store(key, result)
                yield chunk, False
        finally:
            if not future.done():  # the runner failed or was cancelled: waiters run the model themselves
                future.set_result(None)
            if self._inflight.get(key) is future:
                del self._inflight[key]
            if holds_lock:  # released in the background: a cancelled handler must not wait on Redis
                task = asyncio.ensure_future(self.backend.release_lock(lock_key, token))
                self._background.add(task)
                task.add_done_callback(self._background.discard)

    async def _elect(self, key: str, lock_key: str, token: str) -> tuple[bool, CachedResult | None]:
        """Across processes: (True, None) if we hold the lock and run; (False, result) if another process's run
        produced the entry; (False, None) if Redis is unavailable or the other runner timed out: run uncoordinated."""
        lock_ms = int(self.settings.lock_ttl_seconds * 1000)
        poll = POLL_SECONDS
        deadline = time.monotonic() + self.settings.lock_ttl_seconds
        while time.monotonic() < deadline:
            acquired = await self.backend.acquire_lock(lock_key, token, lock_ms)
            if acquired is UNAVAILABLE:
                return False, None
            if acquired:
                blob = await self.backend.get(key)  # the previous holder may have stored it just before releasing
                return True, (_decode(blob) if blob else None)
            blob = await self.backend.get(key)
            if blob is UNAVAILABLE:
                return False, None
            if blob is not None and (found := _decode(blob)) is not None:
                return False, found
            await asyncio.sleep(poll)
            poll = min(poll * 1.5, MAX_POLL_SECONDS)  # the runner may take seconds: do not hammer Redis
        log.warning("cache: waited %.0f s for another process to fill %s; running it here",
                    self.settings.lock_ttl_seconds, key)
        return False, None

    async def _store(self, key: str, result: CachedResult | None) -> None:
        if result is None:
            CACHE_SKIPPED.labels("not_finished").inc()
            return
        blob = result.to_bytes()
        if len(blob) > self.settings.max_entry_bytes:
            CACHE_SKIPPED.labels("too_large").inc()
            return
        if await self.backend.set(key, blob, self._ttl_ms()):
            CACHE_STORES.inc()


def _decode(blob: bytes) -> CachedResult | None:
    """A stored entry, or None (counted as an error) when it is corrupt or not ours: a bad entry is a miss."""
    try:
        return CachedResult.from_bytes(blob)
    except (ValueError, KeyError, TypeError) as err:
        CACHE_ERRORS.labels("decode").inc()
        log.warning("cache: unreadable entry ignored (%s: %s)", type(err).__name__, err)
        return None


async def _run(engine: Engine, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
    async with contextlib.aclosing(engine.generate(request)) as stream:
        async for chunk in stream:
            yield chunk
