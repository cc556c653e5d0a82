"""Multimodal servicer: protobuf in, validated domain values to the image engine (`ImageEngine`), protobuf out.

It knows the engine only through its contract (base.py) and limits (`engine.limits`); image bytes are checked and
encoded by prunefusion.images (Pillow, no torch)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator

from prunefusion.images import check_output_size, decode_image, encode_png
from prunefusion.server.engines.base import (
    CaptionRequest,
    ImageEngine,
    ImageGenerationRequest,
    InterleavedRequest,
    TextPart,
)
from prunefusion.server.engines.validation import image_settings, in_range
from prunefusion.server.errors import grpc_status, unary_errors
from prunefusion.server.registry import ModelRegistry
from prunefusion.server.servicers.text_generation import deadline_of
from prunefusion_client.v1 import multimodal_pb2 as pb
from prunefusion_client.v1 import multimodal_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
request_log = logging.getLogger("prunefusion.server.requests")  # INFO only with server.log_requests
MAX_INTERLEAVED_IMAGES = 4


def _optional(request, name: str, default):
    return getattr(request, name) if request.HasField(name) else default


class MultimodalServicer(pb_grpc.MultimodalServicer):
    def __init__(self, registry: ModelRegistry, *, expose_paths: bool = False):
        self._registry = registry
        self._expose_paths = expose_paths  # server.expose_paths: model directories are the server's business

    def _engine(self, name: str) -> ImageEngine:
        return self._registry.get(name, task="multimodal")

    @staticmethod
    def _image_settings(engine: ImageEngine, request) -> tuple[int, float, int]:
        return image_settings(engine.limits, _optional(request, "steps", None),
                              _optional(request, "guidance_scale", None), _optional(request, "seed", None))

    @staticmethod
    def _max_tokens(engine: ImageEngine, request) -> int:
        limit = engine.limits.max_caption_tokens
        max_tokens = _optional(request, "max_tokens", limit)
        in_range("max_tokens", max_tokens, 1, limit)
        return max_tokens

    @unary_errors
    async def GenerateImage(self, request: pb.GenerateImageRequest, context) -> pb.GenerateImageResponse:
        arrival = time.monotonic()
        engine = self._engine(request.model)
        engine.check_prompt(request.prompt)
        steps, guidance, seed = self._image_settings(engine, request)
        size = check_output_size(_optional(request, "size", None), engine.limits.image_size, engine.limits.max_size)
        result = await engine.generate_image(ImageGenerationRequest(request.prompt, steps, guidance, seed,
                                                                    deadline_of(context)))
        png, width, height = encode_png(result.pixels, size)
        request_id = request.request_id or uuid.uuid4().hex
        timings = pb.ImageTimings(queue_seconds=result.queue_seconds, total_seconds=time.monotonic() - arrival,
                                  batch_size=result.batch_size)
        request_log.info("image %s model=%s steps=%d guidance=%.1f seed=%d batch=%d total=%.0fms", request_id,
                 engine.name, steps, guidance, seed, result.batch_size, timings.total_seconds * 1e3)
        return pb.GenerateImageResponse(request_id=request_id, model=engine.name, png=png, width=width, height=height,
                                        steps=steps, guidance_scale=guidance, seed=seed, timings=timings)

    @unary_errors
    async def Caption(self, request: pb.CaptionRequest, context) -> pb.CaptionResponse:
        arrival = time.monotonic()
        engine = self._engine(request.model)
        max_tokens = self._max_tokens(engine, request)
        # off the event loop: decoding a PNG or JPEG of up to images.max_size takes milliseconds to tens of them
        pixels = await asyncio.to_thread(decode_image, request.image, engine.limits.image_size, engine.limits.max_size)
        result = await engine.caption(CaptionRequest(pixels, max_tokens, deadline_of(context)))
        return pb.CaptionResponse(
            request_id=request.request_id or uuid.uuid4().hex, model=engine.name, text=result.text,
            timings=pb.ImageTimings(queue_seconds=result.queue_seconds, total_seconds=time.monotonic() - arrival,
                                    batch_size=result.batch_size))

    async def GenerateInterleaved(self, request: pb.GenerateInterleavedRequest,
                                  context) -> AsyncIterator[pb.InterleavedPart]:
        async with grpc_status(context):
            engine = self._engine(request.model)
            engine.check_prompt(request.prompt)
            steps, guidance, seed = self._image_settings(engine, request)
            max_tokens = self._max_tokens(engine, request)
            max_images = _optional(request, "max_images", 1)
            in_range("max_images", max_images, 0, MAX_INTERLEAVED_IMAGES)
            request_id = request.request_id or uuid.uuid4().hex
            parts = engine.interleaved(InterleavedRequest(request.prompt, max_tokens, max_images, steps, guidance,
                                                          seed, deadline_of(context)))
            async with contextlib.aclosing(parts):  # a cancel or deadline frees the model thread's generator now
                async for part in parts:
                    if isinstance(part, TextPart):
                        yield pb.InterleavedPart(request_id=request_id, text=part.text)
                    else:
                        png, width, height = encode_png(part.pixels)
                        yield pb.InterleavedPart(request_id=request_id,
                                                 image=pb.Image(png=png, width=width, height=height))

    @unary_errors
    async def ListImageModels(self, request, context) -> pb.ListImageModelsResponse:
        models = []
        for engine in self._registry.engines(task="multimodal"):
            limits, info = engine.limits, engine.info
            models.append(pb.ImageModelInfo(
                name=engine.name, num_parameters=info.num_parameters, weights_digest=info.weights_digest,
                image_size=limits.image_size, max_size=limits.max_size, max_steps=limits.max_steps,
                default_steps=limits.default_steps, default_guidance_scale=limits.default_guidance_scale,
                max_caption_tokens=limits.max_caption_tokens, max_batch_size=limits.max_batch_size,
                max_wait_seconds=limits.max_wait_seconds, path=info.path if self._expose_paths else ""))
        return pb.ListImageModelsResponse(models=models)
