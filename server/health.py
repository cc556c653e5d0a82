"""grpc's health servicer, with Watch streams that end when the server drains.

A client with client-side health checking keeps a Watch stream open for as long as it is connected; such a stream
never finishes by itself, so it held every drain open for its whole `drain_seconds` (and the flush after). Once the
drain begins (after the drain delay, so watchers have heard NOT_SERVING) every Watch stream is ended with OK.
"""

from __future__ import annotations

import asyncio
import contextlib

from grpc_health.v1 import health


class DrainableHealth(health.aio.HealthServicer):
    def __init__(self) -> None:
        super().__init__()
        self._draining = asyncio.Event()

    async def Watch(self, request, context) -> None:
        watch = asyncio.ensure_future(super().Watch(request, context))
        draining = asyncio.ensure_future(self._draining.wait())
        try:
            await asyncio.wait({watch, draining}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (watch, draining):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch  # its own clean-up (the watcher count) runs before the call ends
        if watch.done() and not watch.cancelled() and watch.exception() is not None:
            raise watch.exception()

    def end_watches(self) -> None:
        self._draining.set()
