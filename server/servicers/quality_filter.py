"""QualityFilter servicer: protobuf in, ScoreOptions to the pure pipeline (on worker processes), protobuf out."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator

from prunefusion.home import expand_path
from prunefusion.quality.batch_methods import BATCH_METHODS
from prunefusion.quality.pipeline import (
    METHODS,
    BatchResult,
    ScoreOptions,
    parse_thresholds,
    reason_codes,
    score_batch,
    scoring_executor,
)
from prunefusion.quality.rule_profiles import RULE_PROFILES, default_thresholds
from prunefusion.quality.rules import threshold_defaults
from prunefusion.quality.sharma import load_weights
from prunefusion.server.config import QualityConfig
from prunefusion.server.engines.base import InvalidRequestError, QueueFullError
from prunefusion.server.errors import grpc_status, unary_errors
from prunefusion_client.v1 import quality_filter_pb2 as pb
from prunefusion_client.v1 import quality_filter_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


def _result_pb(result: BatchResult, request_id: str, seconds: float) -> pb.ScoreResponse:
    results = []
    for r in result.results:
        message = pb.DocumentResult(id=r.id, keep=r.keep, reasons=r.reasons, signals=r.signals,
                                    lines=[pb.LineSpan(start=a, end=b, score=s) for a, b, s in r.lines],
                                    duplicate_of=r.duplicate_of or "", text=r.text)
        if r.score is not None:
            message.score = r.score
        results.append(message)
    stats = pb.BatchStats(documents=result.documents, kept=result.kept, reason_counts=result.reason_counts,
                          seconds=seconds)
    if result.mean_score is not None:
        stats.mean_score = result.mean_score
    return pb.ScoreResponse(request_id=request_id, results=results, stats=stats)


class QualityFilterServicer(pb_grpc.QualityFilterServicer):
    def __init__(self, config: QualityConfig) -> None:
        self.config = config
        self.weights = load_weights(None if config.weights is None else expand_path(config.weights))
        self._slots = asyncio.Semaphore(config.max_concurrent_batches)
        self._in_flight = 0  # being scored or waiting for a slot
        self._executor = scoring_executor(config.workers)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

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
            rule_profile=request.rule_profile or c.rule_profile)
        try:
            options.check()
        except ValueError as err:
            raise InvalidRequestError("methods/thresholds", str(err)) from None
        return options

    async def _score(self, request: pb.ScoreRequest) -> pb.ScoreResponse:
        options = self._options(request)
        limit = self.config.max_concurrent_batches
        if self._in_flight >= 2 * limit:  # `limit` being scored and as many waiting
            raise QueueFullError(f"{limit} batches are being scored and {limit} wait; retry later", retry_after_s=0.2)
        started = time.perf_counter()
        self._in_flight += 1
        try:
            await self._slots.acquire()
        except BaseException:  # cancelled while waiting for a slot
            self._in_flight -= 1
            raise
        docs = [(d.id, d.text) for d in request.documents]
        job = asyncio.get_running_loop().run_in_executor(self._executor, score_batch, docs, options, self.weights)

        def release(_job) -> None:  # when the worker is done, not when the caller stops waiting: a cancelled
            self._slots.release()   # request's batch still occupies its worker until it finishes
            self._in_flight -= 1

        job.add_done_callback(release)
        result = await asyncio.shield(job)
        return _result_pb(result, request.request_id, time.perf_counter() - started)

    @unary_errors
    async def Score(self, request: pb.ScoreRequest, context) -> pb.ScoreResponse:
        return await self._score(request)

    async def ScoreStream(self, request_iterator, context) -> AsyncIterator[pb.ScoreResponse]:
        async with grpc_status(context):
            async for request in request_iterator:  # one at a time: the next is read after this one is answered
                yield await self._score(request)

    @unary_errors
    async def Info(self, request, context) -> pb.QualityInfoResponse:
        c = self.config
        defaults = {**default_thresholds(c.rule_profile), **threshold_defaults(BATCH_METHODS)}
        return pb.QualityInfoResponse(
            methods=METHODS, default_methods=c.default_methods, reason_codes=reason_codes(),
            weights=self.weights.values, weights_provenance_json=json.dumps(self.weights.provenance, default=str),
            default_thresholds=defaults, max_batch_documents=c.max_batch_documents, max_batch_bytes=c.max_batch_bytes,
            max_concurrent_batches=c.max_concurrent_batches, rule_profiles=list(RULE_PROFILES),
            default_rule_profile=c.rule_profile)
