"""Multimodal servicer: protobuf in, validated domain values to the Transfusion engine, protobuf out."""

from __future__ import annotations

import contextlib
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator

from prunefusion.server.engines.base import InvalidRequestError
from prunefusion.server.engines.images import check_output_size, decode_image, encode_png
from prunefusion.server.engines.validation import MAX_GUIDANCE_SCALE
from prunefusion.server.errors import stream_errors, unary_errors
from prunefusion.server.registry import ModelRegistry
from prunefusion.server.servicers.text_generation import deadline_of
from prunefusion_client.v1 import multimodal_pb2 as pb
from prunefusion_client.v1 import multimodal_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
MAX_INTERLEAVED_IMAGES = 4


def _in_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise InvalidRequestError(name, f"must be in [{low:g}, {high:g}]; got {value:g}")


class MultimodalServicer(pb_grpc.MultimodalServicer):
    def __init__(self, registry: ModelRegistry):
        self._registry = registry

    def _engine(self, name: str):
        return self._registry.get(name, task="multimodal")

    def _image_settings(self, engine, request) -> tuple[int, float, int]:
        o = engine.options
        steps = request.steps if request.HasField("steps") else o.default_steps
        guidance = request.guidance_scale if request.HasField("guidance_scale") else o.default_guidance_scale
        seed = request.seed if request.HasField("seed") else random.getrandbits(63)
        _in_range("steps", steps, 1, o.max_steps)
        _in_range("guidance_scale", guidance, 0.0, MAX_GUIDANCE_SCALE)
        return steps, guidance, seed

    @unary_errors
    async def GenerateImage(self, request: pb.GenerateImageRequest, context) -> pb.GenerateImageResponse:
        from prunefusion.transfusion.sampling import ImageRequest

        arrival = time.monotonic()
        engine = self._engine(request.model)
        engine.check_prompt(request.prompt)
        steps, guidance, seed = self._image_settings(engine, request)
        size = check_output_size(request.size if request.HasField("size") else None, engine.image_size,
                                 engine.options.max_size)
        result = await engine.generate_image(ImageRequest(request.prompt, steps, guidance, seed), deadline_of(context))
        png, width, height = encode_png(result.value, size)
        request_id = request.request_id or uuid.uuid4().hex
        timings = pb.ImageTimings(queue_seconds=result.queue_seconds, total_seconds=time.monotonic() - arrival,
                                  batch_size=result.batch_size)
        log.info("image %s model=%s steps=%d guidance=%.1f seed=%d batch=%d total=%.0fms", request_id,
                 engine.name, steps, guidance, seed, result.batch_size, timings.total_seconds * 1e3)
        return pb.GenerateImageResponse(request_id=request_id, model=engine.name, png=png, width=width, height=height,
                                        steps=steps, guidance_scale=guidance, seed=seed, timings=timings)

    @unary_errors
    async def Caption(self, request: pb.CaptionRequest, context) -> pb.CaptionResponse:
        arrival = time.monotonic()
        engine = self._engine(request.model)
        limit = engine.options.max_caption_tokens
        max_tokens = request.max_tokens if request.HasField("max_tokens") else limit
        _in_range("max_tokens", max_tokens, 1, limit)
        pixels = decode_image(request.image, engine.image_size, engine.options.max_size)
        result = await engine.caption(pixels, max_tokens, deadline_of(context))
        return pb.CaptionResponse(
            request_id=request.request_id or uuid.uuid4().hex, model=engine.name, text=result.value,
            timings=pb.ImageTimings(queue_seconds=result.queue_seconds, total_seconds=time.monotonic() - arrival,
                                    batch_size=result.batch_size))

    @stream_errors
    async def GenerateInterleaved(self, request: pb.GenerateInterleavedRequest,
                                  context) -> AsyncIterator[pb.InterleavedPart]:
        engine = self._engine(request.model)
        engine.check_prompt(request.prompt)
        steps, guidance, seed = self._image_settings(engine, request)
        limit = engine.options.max_caption_tokens
        max_tokens = request.max_tokens if request.HasField("max_tokens") else limit
        max_images = request.max_images if request.HasField("max_images") else 1
        _in_range("max_tokens", max_tokens, 1, limit)
        _in_range("max_images", max_images, 0, MAX_INTERLEAVED_IMAGES)
        request_id = request.request_id or uuid.uuid4().hex
        deadline = deadline_of(context)
        parts = engine.interleaved(request.prompt, max_tokens=max_tokens, max_images=max_images, steps=steps,
                                   guidance_scale=guidance, seed=seed)
        async with contextlib.aclosing(parts):  # a cancel or deadline frees the model thread's generator now
            async for kind, value in parts:
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError("deadline passed during interleaved generation")
                if kind == "text":
                    yield pb.InterleavedPart(request_id=request_id, text=" " + value)
                else:
                    png, width, height = encode_png(value)
                    yield pb.InterleavedPart(request_id=request_id,
                                             image=pb.Image(png=png, width=width, height=height))

    @unary_errors
    async def ListImageModels(self, request, context) -> pb.ListImageModelsResponse:
        models = []
        for engine in self._registry.engines(task="multimodal"):
            o = engine.options
            models.append(pb.ImageModelInfo(
                name=engine.name, num_parameters=engine.info.num_parameters, weights_digest=engine.info.weights_digest,
                image_size=engine.image_size, max_size=o.max_size, max_steps=o.max_steps,
                default_steps=o.default_steps, default_guidance_scale=o.default_guidance_scale,
                max_caption_tokens=o.max_caption_tokens, max_batch_size=o.max_batch_size,
                max_wait_seconds=o.max_wait_s, path=engine.info.path))
        return pb.ListImageModelsResponse(models=models)
