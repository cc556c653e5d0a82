"""Where the QualityFilter service runs its batches: worker processes that a caller who leaves can stop.

``WorkerPool(size)`` keeps `size` processes, each running one call at a time. ``await pool.run(fn, *args,
then=...)`` runs ``fn(*args)`` in an idle worker (waiting for one), then ``then(result)`` in a thread of this
process (building the reply off the event loop), and returns that. When the awaiting caller is cancelled while its
call runs (its client went away, its deadline passed), the worker is killed at once and a fresh one takes its place:
nothing keeps computing for a caller who left, and the next caller does not wait behind it. A worker that dies during
a call (killed, out of memory) fails that call with ``WorkerDied`` and is replaced too.

Workers are forked from multiprocessing's forkserver, a process started once (a fresh interpreter: never forked from
a process running gRPC) with the scoring modules imported and spaCy's tokenizer built (``PRELOAD``), then run
`warm` (if given) before they take a call: a replacement is ready in about 0.05 s, where a spawned interpreter takes
3 s to import spaCy and build its tokenizer on 2 busy cores. ``healthy()`` is False once ``MAX_START_FAILURES`` starts
in a row failed; callers then get ``WorkersUnavailable`` and every new call tries one start again.

``ThreadRunner`` is the same interface over one thread of this process (``quality.workers: 0``): a thread cannot be
stopped, so a cancelled call's caller waits there until the batch ends, as its batch holds the thread.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import pickle
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

log = logging.getLogger(__name__)

PRELOAD = ["prunefusion.quality.batch_preload"]  # imported once, in the forkserver: the pipeline, a warm spaCy
MAX_START_FAILURES = 3  # starts in a row that fail before the pool reports itself unhealthy
START_TIMEOUT_S = 120.0  # a worker's start and warm-up (the forkserver's first start imports PRELOAD: ~3 s)
RETRY_START_S = 1.0  # between failed starts


class WorkerDied(RuntimeError):
    """The worker process ended during the call (killed, out of memory, a crash)."""


class WorkersUnavailable(RuntimeError):
    """No worker could be started."""


def _serve(conn, warm: Callable[[], Any] | None) -> None:
    """A worker's loop: warm up, say so, then (fn, args) in -> (True, result) or (False, exception) out."""
    if warm is not None:
        warm()
    conn.send("ready")
    while True:
        try:
            fn, args = conn.recv()
        except EOFError:  # the pool closed its end
            return
        try:
            reply = (True, fn(*args))
        except BaseException as err:  # noqa: BLE001 - every failure goes back to the caller
            reply = (False, err)
        try:
            conn.send(reply)
        except Exception as err:  # noqa: BLE001 - an unpicklable result or exception: say what it was
            conn.send((False, RuntimeError(f"the worker could not send back its result: {err!r}")))


class _Worker:
    def __init__(self, context, warm: Callable[[], Any] | None) -> None:
        """Start the process and wait until it is warm (blocking: call from a thread)."""
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child, warm), name="prunefusion-quality-worker",
                                       daemon=True)
        self.process.start()
        child.close()
        self.retired = False
        try:
            if not self.conn.poll(START_TIMEOUT_S):
                raise TimeoutError(f"the scoring worker did not start within {START_TIMEOUT_S:.0f} s")
            self.conn.recv()
        except EOFError:
            self.process.join(5)
            raise RuntimeError(f"the scoring worker exited while starting (exit code {self.process.exitcode})"
                               ) from None
        except BaseException:
            self.kill()
            raise

    def call(self, fn: Callable, args: tuple, then: Callable | None) -> tuple[bool, Any]:
        """(True, then(fn(*args))) or (False, the exception fn raised); WorkerDied when the process ends first.
        Blocking: runs in the pool's threads."""
        try:
            self.conn.send((fn, args))
            ok, value = self.conn.recv()
        except (EOFError, OSError) as err:
            raise WorkerDied("the scoring worker ended during the call") from err
        except pickle.UnpicklingError as err:
            return False, RuntimeError(f"the scoring worker's reply could not be read: {err!r}")
        if not ok or then is None:
            return ok, value
        try:
            return True, then(value)
        except Exception as err:  # noqa: BLE001 - the reply's fault, not the worker's
            return False, err

    def alive(self) -> bool:
        return not self.retired and self.process.is_alive()

    def kill(self) -> None:
        self.retired = True
        if self.process.is_alive():  # polls first, so that an exited worker's pid is never signalled
            self.process.kill()


class WorkerPool:
    """`size` killable scoring processes (see the module's docstring). Use from one event loop."""

    def __init__(self, size: int, warm: Callable[[], Any] | None = None, preload: list[str] | None = None) -> None:
        if size < 1:
            raise ValueError(f"a worker pool needs at least one worker, got {size}")
        self.size = size
        self._warm = warm
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(PRELOAD if preload is None else preload)
        self._calls = ThreadPoolExecutor(2 * size, thread_name_prefix="quality-call")  # + killed calls ending
        self._starter = ThreadPoolExecutor(1, thread_name_prefix="quality-start")
        self._idle: asyncio.Queue[_Worker | None] | None = None  # None in the queue: wake-up, starts failing
        self._workers: set[_Worker] = set()
        self._starting = 0
        self._failures = 0
        self._waiting = 0
        self._broken: BaseException | None = None
        self._tasks: set[asyncio.Task] = set()
        self._closed = False

    async def run(self, fn: Callable, *args: Any, then: Callable | None = None) -> Any:
        worker = await self._acquire()
        try:
            ok, value = await asyncio.get_running_loop().run_in_executor(self._calls, worker.call, fn, args, then)
        except BaseException:  # cancelled or timed out while its call runs, or the worker died: replace it
            self._retire(worker)
            raise
        self._idle.put_nowait(worker)
        if not ok:
            raise value
        return value

    def healthy(self) -> bool:
        """False when workers cannot be started (MAX_START_FAILURES in a row); a worker found dead while idle is
        replaced now. True before the first call starts any."""
        for worker in [w for w in self._workers if not w.process.is_alive()]:
            log.warning("scoring worker pid %s died (exit code %s); replacing it", worker.process.pid,
                        worker.process.exitcode)
            self._retire(worker)
        return self._broken is None

    def pids(self) -> list[int]:
        return [w.process.pid for w in self._workers if w.alive()]

    def close(self) -> None:
        """Kill every worker now (their batches are abandoned) and stop starting new ones."""
        self._closed = True
        for worker in self._workers:
            worker.kill()
        self._workers.clear()
        for task in self._tasks:
            task.cancel()
        self._calls.shutdown(wait=False, cancel_futures=True)
        self._starter.shutdown(wait=False, cancel_futures=True)

    async def _acquire(self) -> _Worker:
        if self._closed:
            raise WorkersUnavailable("the scoring workers are shut down")
        if self._idle is None:
            self._idle = asyncio.Queue()
            for _ in range(self.size):
                self._start_soon()
        while True:
            if self._broken is not None and self._idle.empty():
                if not self._starting:
                    self._start_soon()  # one more try for the next caller
                raise WorkersUnavailable(f"no scoring worker could be started: {self._broken}")
            self._waiting += 1
            try:
                worker = await self._idle.get()
            finally:
                self._waiting -= 1
            if worker is None:
                if self._broken is not None:
                    raise WorkersUnavailable(f"no scoring worker could be started: {self._broken}")
                continue  # a stale wake-up: starting works again
            if worker.alive():
                return worker
            self._retire(worker)

    def _retire(self, worker: _Worker) -> None:
        """Kill `worker` (if it still runs) and start its replacement."""
        if worker not in self._workers:
            return
        self._workers.discard(worker)
        worker.kill()
        if not self._closed:
            self._start_soon()

    def _start_soon(self) -> None:
        self._starting += 1
        task = asyncio.ensure_future(self._start())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            worker = await loop.run_in_executor(self._starter, _Worker, self._context, self._warm)
        except Exception as err:  # noqa: BLE001 - counted; the pool reports itself unhealthy after a few
            self._starting -= 1
            self._failures += 1
            log.error("could not start a scoring worker (%d in a row): %s", self._failures, err)
            if self._failures >= MAX_START_FAILURES:
                if self._broken is None:
                    for _ in range(self._waiting):  # wake the callers waiting for a worker: none is coming
                        self._idle.put_nowait(None)
                self._broken = err
            elif not self._closed:
                await asyncio.sleep(RETRY_START_S)
                self._start_soon()
            return
        self._starting -= 1
        if self._closed:
            worker.kill()
            return
        self._failures, self._broken = 0, None
        self._workers.add(worker)
        self._idle.put_nowait(worker)


class ThreadRunner:
    """WorkerPool's interface over one thread of this process: nothing to kill, nothing to replace."""

    def __init__(self) -> None:
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="quality")

    async def run(self, fn: Callable, *args: Any, then: Callable | None = None) -> Any:
        job = asyncio.get_running_loop().run_in_executor(self._thread, _here, fn, args, then)
        try:
            return await asyncio.shield(job)
        except asyncio.CancelledError:
            await asyncio.wait({job})  # a thread cannot be stopped: its caller leaves when its batch ends
            raise

    def healthy(self) -> bool:
        return True

    def pids(self) -> list[int]:
        return []

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)


def _here(fn: Callable, args: tuple, then: Callable | None) -> Any:
    result = fn(*args)
    return result if then is None else then(result)
