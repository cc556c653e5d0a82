"""An engine's model thread that goes away while the engine is idle.

Every OS thread that runs a parallel torch op gets its own OpenMP pool of `torch.get_num_threads()` workers, and
libgomp (what PyTorch's Linux wheels use) cuts every pool's spin-wait to ~100 spins once the threads it manages
outnumber the CPUs. An engine's model thread kept alive while the engine is idle therefore slowed the busy engine
beside it: each decode step's parallel regions then wake their workers through the kernel. Measured on 2 cores
(issue 22): tiny-lm at 16 streams gave 0.47-0.54x its speed alone while an idle neighbour's thread that had once
run a matmul was alive, and all of it back once that thread exited (a thread's OpenMP pool ends with it).

So the thread is released `idle_seconds` after its last call and a new one starts on the next call (a thread start
and a pool start: well under a millisecond, once per busy period). Calls run one at a time, in order, as on a
one-worker ThreadPoolExecutor.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
IDLE_SECONDS = 1.0


class ComputeThread:
    def __init__(self, name: str, idle_seconds: float = IDLE_SECONDS) -> None:
        self.name, self.idle_seconds = name, idle_seconds
        self._executor: ThreadPoolExecutor | None = None
        self._calls = 0  # submitted and not finished
        self._release: asyncio.TimerHandle | None = None
        self._closed = False

    @property
    def alive(self) -> bool:
        """A thread is held (busy, or idle for less than idle_seconds)."""
        return self._executor is not None

    async def run(self, fn: Callable[..., T], *args) -> T:
        if self._closed:
            raise RuntimeError(f"{self.name}: shut down")
        if self._release is not None:
            self._release.cancel()
            self._release = None
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self.name)
        self._calls += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        finally:
            self._calls -= 1
            if self._calls == 0 and not self._closed:
                self._release = asyncio.get_running_loop().call_later(self.idle_seconds, self._let_go)

    def _let_go(self) -> None:
        self._release = None
        if self._calls == 0 and self._executor is not None:
            self._executor.shutdown(wait=False)  # nothing queued: the thread exits now, and its OpenMP pool with it
            self._executor = None

    async def shutdown(self) -> None:
        """Wait for the calls in progress, then stop the thread (later calls raise RuntimeError)."""
        self._closed = True
        if self._release is not None:
            self._release.cancel()
            self._release = None
        if self._executor is not None:
            await asyncio.to_thread(self._executor.shutdown, wait=True)
            self._executor = None
