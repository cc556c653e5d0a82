"""The QualityFilter's worker pool (quality/batch_workers.py) with real processes: calls, errors, a caller who leaves
(its worker killed and replaced, the next call served within a second), workers that die, workers that cannot
start. Functions from the stdlib run in the workers, so that nothing here needs importing there."""

from __future__ import annotations

import asyncio
import functools
import operator
import os
import signal
import time

import pytest

from prunefusion.quality.batch_workers import (
    MAX_START_FAILURES,
    ThreadRunner,
    WorkerDied,
    WorkerPool,
    WorkersUnavailable,
)


def run(coro):
    return asyncio.run(coro)


async def _gone(pid: int, within_s: float = 5.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        await asyncio.sleep(0.02)
    return False


def test_calls_run_in_worker_processes_and_errors_come_back():
    async def main():
        pool = WorkerPool(2)
        try:
            pids = set(await asyncio.gather(*(pool.run(os.getpid) for _ in range(6))))
            assert len(pids) <= 2 and os.getpid() not in pids
            assert await pool.run(operator.add, 2, 3, then=str) == "5"  # `then` here, on the result
            workers = set(pool.pids())  # every worker started so far (one may have answered all six calls above)
            with pytest.raises(ZeroDivisionError):
                await pool.run(operator.truediv, 1, 0)
            # an error in the call does not cost the worker: every worker from before it is still the pool's
            assert workers <= set(pool.pids()) and await pool.run(os.getpid) in set(pool.pids())
            # the workers that answered are still the pool's (on a loaded machine one worker may have taken all six)
            assert pool.healthy() and pids <= set(pool.pids())
        finally:
            pool.close()

    run(main())


@pytest.mark.parametrize("leave", ["cancel", "timeout"])
def test_a_caller_who_leaves_frees_its_worker_within_a_second(leave):
    """One worker busy for 60 s; its caller is cancelled (a client that went away) or times out (a deadline): the
    worker is killed, and the next call is answered by its replacement within a second."""

    async def main():
        pool = WorkerPool(1)
        try:
            first = await pool.run(os.getpid)
            call = asyncio.ensure_future(pool.run(time.sleep, 60))
            await asyncio.sleep(0.3)
            left = time.monotonic()
            if leave == "cancel":
                call.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await call
            else:
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(0.01):
                        await call
            second = await pool.run(os.getpid)
            freed = time.monotonic() - left
            assert second != first and await _gone(first)
            assert freed < 1.0, freed
        finally:
            pool.close()

    run(main())


def test_a_worker_that_dies_is_replaced_and_health_stays_good():
    async def main():
        pool = WorkerPool(1)
        try:
            idle = await pool.run(os.getpid)
            os.kill(idle, signal.SIGKILL)  # dies while idle: health notices and replaces it
            assert await _gone(idle)
            assert pool.healthy()
            busy = await pool.run(os.getpid)
            assert busy != idle
            call = asyncio.ensure_future(pool.run(time.sleep, 60))
            await asyncio.sleep(0.3)
            os.kill(busy, signal.SIGKILL)  # dies during a call: that call fails, the next one runs
            with pytest.raises(WorkerDied):
                await call
            assert await pool.run(os.getpid) not in (idle, busy) and pool.healthy()
        finally:
            pool.close()

    run(main())


def test_workers_that_cannot_start_make_the_pool_unhealthy():
    """A warm-up that fails kills every worker as it starts: after MAX_START_FAILURES starts the pool says it is
    unhealthy, and callers (waiting ones too) get WorkersUnavailable instead of waiting for ever."""

    async def main():
        pool = WorkerPool(1, warm=functools.partial(operator.truediv, 1, 0))
        try:
            assert pool.healthy()  # nothing started yet
            with pytest.raises(WorkersUnavailable):
                async with asyncio.timeout(60):
                    await pool.run(os.getpid)
            assert not pool.healthy()
            with pytest.raises(WorkersUnavailable):
                await pool.run(os.getpid)
        finally:
            pool.close()

    assert MAX_START_FAILURES >= 2
    run(main())


def test_the_thread_runner_has_the_same_interface():
    async def main():
        runner = ThreadRunner()
        try:
            assert await runner.run(operator.add, 2, 3, then=str) == "5" and runner.healthy()
            with pytest.raises(ZeroDivisionError):
                await runner.run(operator.truediv, 1, 0)
            call = asyncio.ensure_future(runner.run(time.sleep, 0.5))
            await asyncio.sleep(0.1)
            call.cancel()
            started = time.monotonic()
            with pytest.raises(asyncio.CancelledError):
                await call
            assert time.monotonic() - started > 0.2  # a thread cannot be stopped: its caller waits for it
        finally:
            runner.close()

    run(main())
