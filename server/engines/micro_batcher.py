"""The micro-batcher the image and embedding engines share: requests wait in one queue, and one task on the event
loop gathers them into batches for the model.

The batcher takes the oldest waiting job, waits up to `max_wait_seconds` after its arrival for more until `full`
says the batch is complete (or the oldest job is gone), picks the batch with `select` (it always starts with the
oldest job) and awaits `run` on it; `run` hands out the results. A job cancelled or past its deadline while waiting
is dropped on every look at the queue, before it costs model time. An error escaping `run` fails the jobs that are
waiting, not the batcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

log = logging.getLogger(__name__)


@dataclass(eq=False)  # identity: jobs are compared with `in`, and payloads may be arrays
class Job:
    future: asyncio.Future
    arrival: float = field(default_factory=time.monotonic, kw_only=True)
    deadline: float | None = field(default=None, kw_only=True)

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline


J = TypeVar("J", bound=Job)


class MicroBatcher(Generic[J]):
    def __init__(self, name: str, *, select: Callable[[list[J]], list[J]], full: Callable[[list[J]], bool],
                 run: Callable[[list[J]], Awaitable[None]]) -> None:
        """`select(waiting)`: the next batch, the oldest job first; `full(waiting)`: stop gathering now;
        `run(batch)`: run it and settle each job's future."""
        self.name = name
        self._select, self._full, self._run = select, full, run
        self._waiting: list[J] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._max_wait_seconds = 0.0
        self.closed = False

    def start(self, max_wait_seconds: float) -> None:
        self._max_wait_seconds = max_wait_seconds
        self._task = asyncio.create_task(self._loop(), name=self.name)

    @property
    def started(self) -> bool:
        return self._task is not None

    @property
    def healthy(self) -> bool:
        return self._task is not None and not self._task.done()

    def live(self) -> list[J]:
        """The jobs still waiting: expired ones fail with TimeoutError, cancelled ones are dropped."""
        for job in self._waiting:
            if not job.future.done() and job.expired():
                job.future.set_exception(TimeoutError("deadline passed while waiting for the model"))
        self._waiting = [j for j in self._waiting if not j.future.done()]
        return self._waiting

    async def submit(self, job: J):
        """Queue the job and await its result (cancelling this await cancels the job's future: it is skipped)."""
        self._waiting.append(job)
        self._wake.set()
        return await job.future

    def fail_waiting(self, err: BaseException) -> None:
        for job in self._waiting:
            if not job.future.done():
                job.future.set_exception(err)
        self._waiting.clear()

    async def close(self, err: BaseException) -> None:
        """Fail the waiting jobs with `err`, let a running batch finish (its callers get their results), stop."""
        self.closed = True
        self.fail_waiting(err)
        self._wake.set()
        if self._task is not None:
            await self._task

    async def _loop(self) -> None:
        while not self.closed:
            try:
                await self._next_batch()
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001 - a bug must fail requests, not silently stop the batcher
                log.exception("%s: batcher error; failing the waiting requests", self.name)
                self.fail_waiting(err)

    async def _next_batch(self) -> None:
        if not self.live():
            self._wake.clear()
            await self._wake.wait()
            return
        first = self._waiting[0]
        window_end = first.arrival + self._max_wait_seconds
        while not first.future.done() and not self._full(self.live()) and time.monotonic() < window_end:
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, window_end - time.monotonic()))
        batch = self._select(self.live())
        if not batch:
            return
        self._waiting = [j for j in self._waiting if j not in batch]
        await self._run(batch)
