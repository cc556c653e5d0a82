"""Embeddings servicer: protobuf in, texts to the embedding engine (`EmbeddingEngine`), vectors out as protobuf.

It knows the engine only through its contract (base.py): no torch, no onnxruntime here."""

from __future__ import annotations

import logging
import time
import uuid

from prunefusion.server.engines.base import EmbeddingEngine, EmbeddingResult
from prunefusion.server.errors import unary_errors
from prunefusion.server.registry import ModelRegistry
from prunefusion.server.servicers.text_generation import deadline_of
from prunefusion_client.v1 import embeddings_pb2 as pb
from prunefusion_client.v1 import embeddings_pb2_grpc as pb_grpc

request_log = logging.getLogger("prunefusion.server.requests")  # INFO only with server.log_requests


def embed_response(engine: EmbeddingEngine, result: EmbeddingResult, request_id: str,
                   arrival: float) -> pb.EmbedResponse:
    timings = pb.EmbeddingTimings(queue_seconds=result.queue_seconds, total_seconds=time.monotonic() - arrival,
                                  batch_size=result.batch_size, batch_texts=result.batch_texts)
    return pb.EmbedResponse(request_id=request_id, model=engine.name,
                            embeddings=[pb.Embedding(values=row.tolist()) for row in result.vectors],
                            dimensions=engine.limits.dimensions, prompt_tokens=result.prompt_tokens, timings=timings)


class EmbeddingsServicer(pb_grpc.EmbeddingsServicer):
    def __init__(self, registry: ModelRegistry, *, expose_paths: bool = False):
        self._registry = registry
        self._expose_paths = expose_paths

    @unary_errors
    async def Embed(self, request: pb.EmbedRequest, context) -> pb.EmbedResponse:
        arrival = time.monotonic()
        engine: EmbeddingEngine = self._registry.get(request.model, task="embedding")
        result = await engine.embed(list(request.texts), deadline_of(context))
        request_id = request.request_id or uuid.uuid4().hex
        request_log.info("embed %s model=%s texts=%d tokens=%d batch=%d/%d", request_id, engine.name,
                         len(request.texts), result.prompt_tokens, result.batch_size, result.batch_texts)
        return embed_response(engine, result, request_id, arrival)

    @unary_errors
    async def ListEmbeddingModels(self, request, context) -> pb.ListEmbeddingModelsResponse:
        models = []
        for engine in self._registry.engines(task="embedding"):
            limits, info = engine.limits, engine.info
            models.append(pb.EmbeddingModelInfo(
                name=engine.name, family=info.family, num_layers=info.num_layers, num_parameters=info.num_parameters,
                weights_digest=info.weights_digest, engine=info.engine, dimensions=limits.dimensions,
                max_tokens=limits.max_tokens, truncate=limits.truncate, max_inputs=limits.max_inputs,
                max_batch_size=limits.max_batch_size, device=info.device,
                path=info.path if self._expose_paths else ""))
        return pb.ListEmbeddingModelsResponse(models=models)
