"""Sync and asyncio clients for prunefusion.v1.

Deadlines: every call takes `timeout` seconds (default: the client's). Retries: only calls that fail with
UNAVAILABLE are retried (gRPC's own retry policy, exponential backoff, at most `max_attempts` tries); a stream is
retried only before its first message arrives, so no chunk is ever repeated. API key and TLS: `api_key=`,
`tls_ca=`, `tls_cert=`, `tls_key=`, `server_name=` (prunefusion_client.connection); the key defaults to
$PRUNEFUSION_API_KEY.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import grpc

from prunefusion_client.connection import Connection, channel_target
from prunefusion_client.v1 import embeddings_pb2 as em
from prunefusion_client.v1 import embeddings_pb2_grpc as em_grpc
from prunefusion_client.v1 import multimodal_pb2 as mm
from prunefusion_client.v1 import multimodal_pb2_grpc as mm_grpc
from prunefusion_client.v1 import quality_filter_pb2 as qf
from prunefusion_client.v1 import quality_filter_pb2_grpc as qf_grpc
from prunefusion_client.v1 import text_generation_pb2 as pb
from prunefusion_client.v1 import text_generation_pb2_grpc as pb_grpc

DEFAULT_TARGET = "localhost:50051"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass
class GenerateOptions:
    """Request parameters; None leaves the server default (see proto/prunefusion/v1/text_generation.proto)."""

    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    request_id: str = ""
    cache_policy: str = "default"  # default | bypass | refresh (see CachePolicy in the proto)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    min_new_tokens: int | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # per-token logprobs with this many top alternatives (response.logprobs)
    n: int | None = None  # samples (response.samples; stream chunks carry `index`)
    messages: list[tuple[str, str]] = field(default_factory=list)  # (role, content): chat instead of a prompt
    prompt_token_ids: list[int] = field(default_factory=list)  # token ids instead of a prompt

    OPTIONAL = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "presence_penalty", "frequency_penalty",
                "repetition_penalty", "min_new_tokens", "logprobs", "n")

    def to_request(self, prompt: str, model: str) -> pb.GenerateRequest:
        optional = {k: getattr(self, k) for k in self.OPTIONAL if getattr(self, k) is not None}
        policy = pb.CachePolicy.Value(f"CACHE_POLICY_{self.cache_policy.upper()}")
        return pb.GenerateRequest(model=model, prompt=prompt, stop=self.stop, request_id=self.request_id,
                                  cache_policy=policy, ignore_eos=self.ignore_eos,
                                  messages=[pb.ChatMessage(role=r, content=c) for r, c in self.messages],
                                  prompt_token_ids=self.prompt_token_ids, **optional)


@dataclass
class ImageOptions:
    """GenerateImage / GenerateInterleaved parameters; None leaves the server default (proto/.../multimodal.proto)."""

    steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    size: int | None = None  # GenerateImage only
    request_id: str = ""

    def to_request(self, prompt: str, model: str) -> mm.GenerateImageRequest:
        return mm.GenerateImageRequest(model=model, prompt=prompt, request_id=self.request_id, **self._optional())

    def to_interleaved(self, prompt: str, model: str, max_tokens: int | None,
                       max_images: int | None) -> mm.GenerateInterleavedRequest:
        extra = {k: v for k, v in (("max_tokens", max_tokens), ("max_images", max_images)) if v is not None}
        optional = {k: v for k, v in self._optional().items() if k != "size"}
        return mm.GenerateInterleavedRequest(model=model, prompt=prompt, request_id=self.request_id, **optional,
                                             **extra)

    def _optional(self) -> dict:
        return {k: v for k, v in (("steps", self.steps), ("guidance_scale", self.guidance_scale),
                                  ("seed", self.seed), ("size", self.size)) if v is not None}


def _caption_request(image: bytes, model: str, max_tokens: int | None) -> mm.CaptionRequest:
    return mm.CaptionRequest(model=model, image=image, **({} if max_tokens is None else {"max_tokens": max_tokens}))


def score_request(documents: list[str] | list[tuple[str, str]], *, methods: list[str] | None = None,
                  thresholds: dict[str, float] | None = None, drop: bool = False, min_score: float | None = None,
                  drop_bottom_percent: float | None = None, line_spans: bool = False,
                  rule_profile: str = "") -> qf.ScoreRequest:
    """A QualityFilter request: documents as texts (ids "0", "1", ...) or (id, text) pairs; thresholds as
    {"family.threshold": value}; rule_profile "" is the server's default ("datatrove" unless configured)."""
    pairs = [(str(i), d) if isinstance(d, str) else d for i, d in enumerate(documents)]
    optional = {k: v for k, v in (("min_score", min_score), ("drop_bottom_percent", drop_bottom_percent))
                if v is not None}
    return qf.ScoreRequest(documents=[qf.Document(id=i, text=t) for i, t in pairs], methods=methods or [],
                           thresholds=thresholds or {}, line_spans=line_spans, rule_profile=rule_profile,
                           mode=qf.FILTER_MODE_DROP if drop else qf.FILTER_MODE_ANNOTATE, **optional)


@contextlib.contextmanager
def _unserved_is_empty():
    """Around a List* call: UNIMPLEMENTED (a server with no model of that kind does not serve the service) is
    swallowed, so the caller's `return []` after the block runs; every other error passes."""
    try:
        yield
    except grpc.RpcError as err:
        if err.code() != grpc.StatusCode.UNIMPLEMENTED:
            raise


def channel_options(max_attempts: int) -> list[tuple[str, object]]:
    """Message limits, the retry policy, and round_robin over every address the target resolves to (several
    replicas: `ipv4:10.0.0.1:50051,10.0.0.2:50051`, or `dns:///prunefusion-headless:50051` for a headless Service),
    so a retry after UNAVAILABLE goes to another replica."""
    config: dict[str, object] = {"loadBalancingConfig": [{"round_robin": {}}]}
    if max_attempts >= 2:  # gRPC requires maxAttempts >= 2 in a retry policy; 1 means no retries at all
        config["methodConfig"] = [{
            "name": [{"service": "prunefusion.v1.TextGeneration"}, {"service": "prunefusion.v1.Multimodal"},
                     {"service": "prunefusion.v1.QualityFilter"}, {"service": "prunefusion.v1.Embeddings"}],
            "retryPolicy": {"maxAttempts": max_attempts, "initialBackoff": "0.1s", "maxBackoff": "2s",
                            "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]},
        }]
    return [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.enable_retries", int(max_attempts >= 2)), ("grpc.service_config", json.dumps(config))]


class Client:
    """Blocking client. Use as a context manager or call close()."""

    def __init__(self, target: str = DEFAULT_TARGET, *, timeout: float = 120.0, max_attempts: int = 4,
                 credentials: grpc.ChannelCredentials | None = None, connection: Connection | None = None,
                 **security: str | None):
        """`security`: Connection's fields (api_key, tls_ca, tls_cert, tls_key, server_name), or pass `connection`."""
        connection = connection or Connection(**security)
        self._channel = connection.channel(channel_target(target), channel_options(max_attempts), credentials)
        self._stub = pb_grpc.TextGenerationStub(self._channel)
        self._images = mm_grpc.MultimodalStub(self._channel)
        self._quality = qf_grpc.QualityFilterStub(self._channel)
        self._embeddings = em_grpc.EmbeddingsStub(self._channel)
        self.timeout = timeout

    def generate(self, prompt: str, model: str = "", options: GenerateOptions | None = None, *,
                 timeout: float | None = None) -> pb.GenerateResponse:
        request = (options or GenerateOptions()).to_request(prompt, model)
        return self._stub.Generate(request, timeout=timeout or self.timeout)

    def chat(self, messages: list[tuple[str, str]], model: str = "", options: GenerateOptions | None = None, *,
             timeout: float | None = None) -> pb.GenerateResponse:
        """The model's reply to (role, content) messages, rendered with its chat template on the server."""
        return self.generate("", model, dataclasses.replace(options or GenerateOptions(), messages=list(messages)),
                             timeout=timeout)

    def generate_stream(self, prompt: str, model: str = "", options: GenerateOptions | None = None, *,
                        timeout: float | None = None) -> Iterator[pb.GenerateStreamChunk]:
        """Yield chunks; closing the iterator early cancels the call (the server frees the slot)."""
        call = self._stub.GenerateStream((options or GenerateOptions()).to_request(prompt, model),
                                         timeout=timeout or self.timeout)
        try:
            yield from call
        finally:
            call.cancel()

    def list_models(self, *, timeout: float | None = None) -> list[pb.ModelInfo]:
        """The text models served ([] from a server that serves none: it does not register the service)."""
        with _unserved_is_empty():
            return list(self._stub.ListModels(pb.ListModelsRequest(), timeout=timeout or self.timeout).models)
        return []

    def generate_image(self, prompt: str, model: str = "", options: ImageOptions | None = None, *,
                       timeout: float | None = None) -> mm.GenerateImageResponse:
        """An image for the prompt: the response's `png` holds PNG bytes; steps, guidance and seed used are echoed."""
        request = (options or ImageOptions()).to_request(prompt, model)
        return self._images.GenerateImage(request, timeout=timeout or self.timeout)

    def caption(self, image: bytes, model: str = "", *, max_tokens: int | None = None,
                timeout: float | None = None) -> mm.CaptionResponse:
        """Caption PNG or JPEG bytes."""
        return self._images.Caption(_caption_request(image, model, max_tokens), timeout=timeout or self.timeout)

    def generate_interleaved(self, prompt: str, model: str = "", options: ImageOptions | None = None, *,
                             max_tokens: int | None = None, max_images: int | None = None,
                             timeout: float | None = None) -> Iterator[mm.InterleavedPart]:
        request = (options or ImageOptions()).to_interleaved(prompt, model, max_tokens, max_images)
        call = self._images.GenerateInterleaved(request, timeout=timeout or self.timeout)
        try:
            yield from call
        finally:
            call.cancel()

    def list_image_models(self, *, timeout: float | None = None) -> list[mm.ImageModelInfo]:
        """The image models served ([] from a server that serves none)."""
        with _unserved_is_empty():
            return list(self._images.ListImageModels(mm.ListImageModelsRequest(),
                                                     timeout=timeout or self.timeout).models)
        return []

    def score(self, request: qf.ScoreRequest, *, timeout: float | None = None) -> qf.ScoreResponse:
        """Score a batch (build it with `score_request`)."""
        return self._quality.Score(request, timeout=timeout or self.timeout)

    def score_stream(self, requests, *, timeout: float | None = None) -> Iterator[qf.ScoreResponse]:
        """Score an iterable of batches; responses come back in order."""
        call = self._quality.ScoreStream(iter(requests), timeout=timeout or self.timeout)
        try:
            yield from call
        finally:
            call.cancel()

    def quality_info(self, *, timeout: float | None = None) -> qf.QualityInfoResponse:
        return self._quality.Info(qf.QualityInfoRequest(), timeout=timeout or self.timeout)

    def embed(self, texts: list[str], model: str = "", *, request_id: str = "",
              timeout: float | None = None) -> em.EmbedResponse:
        """Sentence embeddings: `response.embeddings[i].values` is texts[i]'s unit-norm vector (see `vectors`)."""
        request = em.EmbedRequest(model=model, texts=list(texts), request_id=request_id)
        return self._embeddings.Embed(request, timeout=timeout or self.timeout)

    def list_embedding_models(self, *, timeout: float | None = None) -> list[em.EmbeddingModelInfo]:
        """The embedding models served ([] from a server that serves none)."""
        with _unserved_is_empty():
            return list(self._embeddings.ListEmbeddingModels(em.ListEmbeddingModelsRequest(),
                                                             timeout=timeout or self.timeout).models)
        return []

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """asyncio client (grpc.aio). Use as an async context manager or await close()."""

    def __init__(self, target: str = DEFAULT_TARGET, *, timeout: float = 120.0, max_attempts: int = 4,
                 credentials: grpc.ChannelCredentials | None = None, connection: Connection | None = None,
                 **security: str | None):
        connection = connection or Connection(**security)
        self._channel = connection.aio_channel(channel_target(target), channel_options(max_attempts), credentials)
        self._stub = pb_grpc.TextGenerationStub(self._channel)
        self._images = mm_grpc.MultimodalStub(self._channel)
        self._quality = qf_grpc.QualityFilterStub(self._channel)
        self._embeddings = em_grpc.EmbeddingsStub(self._channel)
        self.timeout = timeout

    async def generate(self, prompt: str, model: str = "", options: GenerateOptions | None = None, *,
                       timeout: float | None = None) -> pb.GenerateResponse:
        request = (options or GenerateOptions()).to_request(prompt, model)
        return await self._stub.Generate(request, timeout=timeout or self.timeout)

    async def chat(self, messages: list[tuple[str, str]], model: str = "", options: GenerateOptions | None = None,
                   *, timeout: float | None = None) -> pb.GenerateResponse:
        return await self.generate("", model, dataclasses.replace(options or GenerateOptions(),
                                                                  messages=list(messages)), timeout=timeout)

    async def generate_stream(self, prompt: str, model: str = "", options: GenerateOptions | None = None, *,
                              timeout: float | None = None) -> AsyncIterator[pb.GenerateStreamChunk]:
        call = self._stub.GenerateStream((options or GenerateOptions()).to_request(prompt, model),
                                         timeout=timeout or self.timeout)
        try:
            async for chunk in call:
                yield chunk
        finally:
            call.cancel()

    async def list_models(self, *, timeout: float | None = None) -> list[pb.ModelInfo]:
        with _unserved_is_empty():
            response = await self._stub.ListModels(pb.ListModelsRequest(), timeout=timeout or self.timeout)
            return list(response.models)
        return []

    async def generate_image(self, prompt: str, model: str = "", options: ImageOptions | None = None, *,
                             timeout: float | None = None) -> mm.GenerateImageResponse:
        request = (options or ImageOptions()).to_request(prompt, model)
        return await self._images.GenerateImage(request, timeout=timeout or self.timeout)

    async def caption(self, image: bytes, model: str = "", *, max_tokens: int | None = None,
                      timeout: float | None = None) -> mm.CaptionResponse:
        """Caption PNG or JPEG bytes."""
        return await self._images.Caption(_caption_request(image, model, max_tokens), timeout=timeout or self.timeout)

    async def generate_interleaved(self, prompt: str, model: str = "", options: ImageOptions | None = None, *,
                                   max_tokens: int | None = None, max_images: int | None = None,
                                   timeout: float | None = None) -> AsyncIterator[mm.InterleavedPart]:
        request = (options or ImageOptions()).to_interleaved(prompt, model, max_tokens, max_images)
        call = self._images.GenerateInterleaved(request, timeout=timeout or self.timeout)
        try:
            async for part in call:
                yield part
        finally:
            call.cancel()

    async def list_image_models(self, *, timeout: float | None = None) -> list[mm.ImageModelInfo]:
        with _unserved_is_empty():
            response = await self._images.ListImageModels(mm.ListImageModelsRequest(), timeout=timeout or self.timeout)
            return list(response.models)
        return []

    async def score(self, request: qf.ScoreRequest, *, timeout: float | None = None) -> qf.ScoreResponse:
        """Score a batch (build it with `score_request`)."""
        return await self._quality.Score(request, timeout=timeout or self.timeout)

    async def score_stream(self, requests, *, timeout: float | None = None) -> AsyncIterator[qf.ScoreResponse]:
        """Score an iterable (or async iterable) of batches; responses come back in order."""
        call = self._quality.ScoreStream(requests, timeout=timeout or self.timeout)
        try:
            async for response in call:
                yield response
        finally:
            call.cancel()

    async def quality_info(self, *, timeout: float | None = None) -> qf.QualityInfoResponse:
        return await self._quality.Info(qf.QualityInfoRequest(), timeout=timeout or self.timeout)

    async def embed(self, texts: list[str], model: str = "", *, request_id: str = "",
                    timeout: float | None = None) -> em.EmbedResponse:
        request = em.EmbedRequest(model=model, texts=list(texts), request_id=request_id)
        return await self._embeddings.Embed(request, timeout=timeout or self.timeout)

    async def list_embedding_models(self, *, timeout: float | None = None) -> list[em.EmbeddingModelInfo]:
        with _unserved_is_empty():
            response = await self._embeddings.ListEmbeddingModels(em.ListEmbeddingModelsRequest(),
                                                                  timeout=timeout or self.timeout)
            return list(response.models)
        return []

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def vectors(response: em.EmbedResponse) -> list[list[float]]:
    """An EmbedResponse's vectors as lists of floats, in the order of the request's texts."""
    return [list(e.values) for e in response.embeddings]
