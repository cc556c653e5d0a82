"""QualityFilter servicer: protobuf in, ScoreOptions to the pure pipeline (on worker processes), protobuf out.

A batch is scored on a worker process (quality/batch_workers.py), which also builds and serializes its reply: the
server parses it back in C (upb), so the reply's line spans never become Python objects here. Building 80,000 of them
in the server took 0.1-0.5 s of event loop, and their allocations set off collections of the whole server heap
(0.27 s measured with torch loaded) that stall every thread. A request whose client cancels it, or whose deadline
passes while it waits or is scored, stops at once: a running batch's worker is killed and replaced (about 0.05 s),
so the next request does not wait behind work nobody will read. ``healthy()`` says whether scoring workers can run.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from prunefusion.home import expand_path
from prunefusion.quality.batch_methods import BATCH_METHODS
from prunefusion.quality.batch_workers import PRELOAD, ThreadRunner, WorkerDied, WorkerPool, WorkersUnavailable
from prunefusion.quality.pipeline import (
    METHODS,
    BatchResult,
    ScoreOptions,
    parse_thresholds,
    reason_codes,
    score_batch,
)
from prunefusion.quality.rule_profiles import RULE_PROFILES, default_thresholds
from prunefusion.quality.rules import threshold_defaults
from prunefusion.quality.sharma import load_weights
from prunefusion.server.config import QualityConfig
from prunefusion.server.engines.base import EngineUnavailableError, InvalidRequestError, QueueFullError
from prunefusion.server.errors import grpc_status, unary_errors
from prunefusion_client.v1 import quality_filter_pb2 as pb
from prunefusion_client.v1 import quality_filter_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


def _scored_reply(docs: list[tuple[str, str]], options: ScoreOptions, weights, request_id: str) -> bytes:
    """In a scoring worker: the batch scored and its reply serialized (its `stats.seconds` set by the caller)."""
    return _result_pb(score_batch(docs, options, weights), request_id, time.perf_counter()).SerializeToString()


def _parsed_reply(data: bytes, started: float) -> pb.ScoreResponse:
    """In the pool's thread: the reply back from its bytes, timed from the request's arrival."""
    reply = pb.ScoreResponse.FromString(data)
    reply.stats.seconds = time.perf_counter() - started
    return reply


def _result_pb(result: BatchResult, request_id: str, started: float) -> pb.ScoreResponse:
    results = []
    for r in result.results:
        message = pb.DocumentResult(id=r.id, keep=r.keep, reasons=r.reasons, signals=r.signals,
                                    lines=[pb.LineSpan(start=a, end=b, score=s) for a, b, s in r.lines],
                                    duplicate_of=r.duplicate_of or "", text=r.text)
        if r.score is not None:
            message.score = r.score
        results.append(message)
    stats = pb.BatchStats(documents=result.documents, kept=result.kept, reason_counts=result.reason_counts,
                          seconds=time.perf_counter() - started)
    if result.mean_score is not None:
        stats.mean_score = result.mean_score
    return pb.ScoreResponse(request_id=request_id, results=results, stats=stats)


def public_provenance(value: Any) -> Any:
    """The weights' provenance without server paths: an absolute path (or ~/..., file://...) becomes its last
    component (a model's or corpus's name stays readable), at any depth."""
    if isinstance(value, dict):
        return {key: public_provenance(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [public_provenance(item) for item in value]
    if isinstance(value, str) and (os.path.isabs(value) or value.startswith(("~", "file:")) or value[1:3] == ":\\"):
        return os.path.basename(value.replace("\\", "/").rstrip("/")) or "(path)"
    return value


class QualityFilterServicer(pb_grpc.QualityFilterServicer):
    def __init__(self, config: QualityConfig) -> None:
        self.config = config
        self.weights = load_weights(None if config.weights is None else expand_path(config.weights))
        self._provenance_json = json.dumps(public_provenance(self.weights.provenance), default=str)
        self._slots = asyncio.Semaphore(config.max_concurrent_batches)
        self._in_flight = 0  # being scored or waiting for a slot
        # workers import this module for _scored_reply: the forkserver imports it once (grpc too, which starts no
        # thread at import: forking after it is safe; the gRPC server itself never forks)
        self._workers = (WorkerPool(config.workers, preload=[*PRELOAD, __name__]) if config.workers > 0
                         else ThreadRunner())

    def healthy(self) -> bool:
        """False when the scoring workers are dead and cannot be replaced (starting them failed 3 times in a row);
        a worker found dead is replaced. True before the first Score starts them, and with `workers: 0`."""
        return self._workers.healthy()

    def close(self) -> None:
        """Stop scoring now: the workers are killed, batches still running are abandoned."""
        self._workers.close()

    def _options(self, request: pb.ScoreRequest) -> ScoreOptions:
        c = self.config
        if len(request.documents) > c.max_batch_documents:
            raise InvalidRequestError("documents", f"{len(request.documents)} documents; at most "
                                      f"{c.max_batch_documents} per request")
        size = sum(len(d.text.encode()) for d in request.documents)
        if size > c.max_batch_bytes:
            raise InvalidRequestError("documents", f"{size} bytes of text; at most {c.max_batch_bytes} per request")
        ids = [d.id for d in request.documents]
        if len(set(ids)) != len(ids) or "" in ids:
            raise InvalidRequestError("documents", "every document needs a non-empty id, unique within the request")
        try:
            thresholds = parse_thresholds(dict(request.thresholds))
        except ValueError as err:
            raise InvalidRequestError("thresholds", str(err)) from None
        options = ScoreOptions(
            methods=tuple(request.methods) or tuple(c.default_methods), thresholds=thresholds,
            min_score=request.min_score if request.HasField("min_score") else None,
            drop_bottom_percent=request.drop_bottom_percent if request.HasField("drop_bottom_percent") else None,
            drop=request.mode == pb.FILTER_MODE_DROP, line_spans=request.line_spans,
            rule_profile=request.rule_profile or c.rule_profile, max_document_bytes=c.max_document_bytes)
        try:
            options.check()
        except ValueError as err:
            raise InvalidRequestError("methods/thresholds", str(err)) from None
        return options

    async def _score(self, request: pb.ScoreRequest, context) -> pb.ScoreResponse:
        options = self._options(request)
        limit = self.config.max_concurrent_batches
        if self._in_flight >= 2 * limit:  # `limit` being scored and as many waiting
            raise QueueFullError(f"{limit} batches are being scored and {limit} wait; retry later", retry_after_s=0.2)
        started = time.perf_counter()
        docs = [(d.id, d.text) for d in request.documents]
        self._in_flight += 1
        try:
            async with asyncio.timeout(context.time_remaining()):  # None: no deadline; past it: DEADLINE_EXCEEDED
                async with self._slots:
                    return await self._workers.run(_scored_reply, docs, options, self.weights, request.request_id,
                                                   then=functools.partial(_parsed_reply, started=started))
        except (WorkerDied, WorkersUnavailable) as err:
            log.warning("a Score failed: %s", err)
            raise EngineUnavailableError(f"scoring failed: {err}") from None
        finally:
            self._in_flight -= 1

    @unary_errors
    async def Score(self, request: pb.ScoreRequest, context) -> pb.ScoreResponse:
        return await self._score(request, context)

    async def ScoreStream(self, request_iterator, context) -> AsyncIterator[pb.ScoreResponse]:
        async with grpc_status(context):
            async for request in request_iterator:  # one at a time: the next is read after this one is answered
                yield await self._score(request, context)

    @unary_errors
    async def Info(self, request, context) -> pb.QualityInfoResponse:
        c = self.config
        defaults = {**default_thresholds(c.rule_profile), **threshold_defaults(BATCH_METHODS)}
        return pb.QualityInfoResponse(
            methods=METHODS, default_methods=c.default_methods, reason_codes=reason_codes(),
            weights=self.weights.values, weights_provenance_json=self._provenance_json,
            default_thresholds=defaults, max_batch_documents=c.max_batch_documents, max_batch_bytes=c.max_batch_bytes,
            max_concurrent_batches=c.max_concurrent_batches, rule_profiles=list(RULE_PROFILES),
            default_rule_profile=c.rule_profile)
