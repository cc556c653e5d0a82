"""n samples of one request: n engine requests (ids `<id>-<i>`, seeds seed + i) and their streams merged.

Front ends (gRPC and HTTP) ask for `n` this way; engines only ever see single requests, so every engine and the
response cache handle samples with no code of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Sequence

from prunefusion.errors import InvalidRequestError
from prunefusion.server.engines.base import GenerationChunk, GenerationRequest, GenerationResult, collect

MAX_SAMPLES = 8
_DONE = object()


def sample_requests(request: GenerationRequest, n: int) -> list[GenerationRequest]:
    """The request itself for n == 1; else n copies with their own ids and (when seeded) seeds."""
    if not 1 <= n <= MAX_SAMPLES:
        raise InvalidRequestError("n", f"must be in [1, {MAX_SAMPLES}], got {n}")
    if n == 1:
        return [request]
    seed = request.params.seed
    return [dataclasses.replace(request, request_id=f"{request.request_id}-{i}", params=dataclasses.replace(
        request.params, seed=None if seed is None else (seed + i) % 2**63)) for i in range(n)]


async def merged(streams: Sequence[AsyncIterator[GenerationChunk]]) -> AsyncIterator[tuple[int, GenerationChunk]]:
    """(sample index, chunk) from every stream, in the order they arrive. The first error ends it; closing it closes
    every stream (their requests are cancelled). One stream is passed through without tasks."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as only:
            async for chunk in only:
                yield 0, chunk
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[GenerationChunk]) -> None:
        try:
            async with contextlib.aclosing(stream):
                async for chunk in stream:
                    await queue.put((index, chunk))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer
            await queue.put((index, exc))
        await queue.put((index, _DONE))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is _DONE:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def collect_samples(chunks: AsyncIterator[tuple[int, GenerationChunk]]) -> list[GenerationResult]:
    """Each sample's whole result (index order) from a merged stream: `collect` per sample."""
    streams: dict[int, list[GenerationChunk]] = {}
    async for index, chunk in chunks:
        streams.setdefault(index, []).append(chunk)

    async def replay(parts: list[GenerationChunk]) -> AsyncIterator[GenerationChunk]:
        for part in parts:
            yield part

    return [await collect(replay(streams[i])) for i in sorted(streams)]
