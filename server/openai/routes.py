"""The OpenAI routes: /v1/models, /v1/completions, /v1/chat/completions (SSE with `stream: true`),
/v1/images/generations, and /health (live) and /ready.

Each route parses its body strictly (schemas.py), passes the same API-key checks as gRPC (AccessControl.http_call,
held until the response is sent), asks the registry for the model (text models come behind the response cache)
and answers in OpenAI's shape. A stream's first chunk is awaited before the 200 goes out, so a refused request
(queue full, prompt too long) still gets its own status; a client that goes away closes the engine's stream, which
frees the request's slot before the next decode step.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException

from prunefusion.images import check_output_size, encode_png
from prunefusion.server.auth.interceptor import AccessControl
from prunefusion.server.engines.base import (
    CachePolicy,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    ImageGenerationRequest,
    InvalidRequestError,
    Usage,
    collect,
)
from prunefusion.server.engines.fanout import merged, sample_requests
from prunefusion.server.engines.validation import image_settings
from prunefusion.server.openai.errors import describe, error_body, error_response
from prunefusion.server.openai.schemas import ChatCompletionRequest, CompletionRequest, ImageRequest, parse
from prunefusion.server.registry import ModelRegistry

TEXT_SERVICE, IMAGE_SERVICE = "prunefusion.v1.TextGeneration", "prunefusion.v1.Multimodal"
FINISH_REASONS = {FinishReason.LENGTH: "length", FinishReason.STOP: "stop", FinishReason.EOS: "stop",
                  FinishReason.CANCELLED: "abort"}


@dataclass
class HttpContext:
    """What the routes need from the server."""

    registry: ModelRegistry
    access: AccessControl | None
    ready: Callable[[], bool]  # the overall health ("" SERVING): /ready
    max_body_bytes: int
    started: int  # unix time, the models' `created`


def openai_errors(route):
    """Every exception a route raises becomes OpenAI's error body with its status (errors.py)."""
    @functools.wraps(route)
    async def wrapper(*args, **kwargs):
        try:
            return await route(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - every error gets a deliberate status
            return error_response(exc)

    return wrapper


async def read_json(request: Request, limit: int) -> object:
    """The body as JSON, read at most `limit` bytes far (a larger body is refused before it is all read)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise InvalidRequestError("body", f"is {int(declared)} bytes; at most {limit} are accepted")
    data = bytearray()
    async for piece in request.stream():
        data += piece
        if len(data) > limit:
            raise InvalidRequestError("body", f"is over {limit} bytes, the most accepted")
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InvalidRequestError("body", f"is not valid JSON ({err})") from None


# A request's time limit in seconds: ours, and the one the official openai client sends with every call (its
# `timeout`), so generation stops when the client would give up anyway. Past it: 504 (or a stream's error event).
TIMEOUT_HEADERS = ("x-request-timeout", "x-stainless-timeout")


def request_deadline(request: Request) -> float | None:
    """The deadline (time.monotonic()) a timeout header sets; None without one. A bad value is a 400 naming it."""
    for header in TIMEOUT_HEADERS:
        value = request.headers.get(header)
        if value is None:
            continue
        try:
            seconds = float(value)
        except ValueError:
            raise InvalidRequestError(header, f"must be a number of seconds, got {value!r}") from None
        if not (0 < seconds < float("inf")):
            raise InvalidRequestError(header, f"must be a positive number of seconds, got {value!r}")
        return time.monotonic() + seconds
    return None


def usage_json(usage: Usage) -> dict:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens}


def finish_json(reason: FinishReason) -> str:
    if reason is FinishReason.DEADLINE:
        raise TimeoutError("the request's deadline passed")
    return FINISH_REASONS[reason]


def completion_logprobs(logprobs) -> dict | None:
    """/v1/completions' legacy logprobs object for a choice's (or a chunk's) tokens."""
    if not logprobs:
        return None
    offsets, at = [], 0
    for lp in logprobs:
        offsets.append(at)
        at += len(lp.token)
    return {"tokens": [lp.token for lp in logprobs], "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [{text: v for _, text, v in lp.top} for lp in logprobs], "text_offset": offsets}


def chat_logprobs(logprobs) -> dict | None:
    """/v1/chat/completions' logprobs object: per token its logprob, UTF-8 bytes and top alternatives."""
    if not logprobs:
        return None

    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {"content": [{**entry(lp.token, lp.logprob), "top_logprobs": [entry(text, v) for _, text, v in lp.top]}
                        for lp in logprobs]}


class Shapes:
    """The response objects of one endpoint (completions or chat): whole, streamed chunk, usage-only chunk."""

    def __init__(self, chat: bool, model: str, request_id: str, created: int):
        self.chat, self.model, self.id, self.created = chat, model, request_id, created
        self.object = "chat.completion" if chat else "text_completion"
        self.chunk_object = "chat.completion.chunk" if chat else "text_completion"
        self.logprobs = chat_logprobs if chat else completion_logprobs

    def choice(self, index: int, result) -> dict:
        body = {"message": {"role": "assistant", "content": result.text}} if self.chat else {"text": result.text}
        return {"index": index, **body, "logprobs": self.logprobs(result.logprobs),
                "finish_reason": finish_json(result.finish_reason)}

    def whole(self, results) -> dict:
        usage = Usage(sum(r.usage.prompt_tokens for r in results), sum(r.usage.completion_tokens for r in results))
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": [self.choice(i, r) for i, r in enumerate(results)],
                "usage": usage_json(usage), "cached": all(r.cached for r in results)}

    def chunk(self, index: int, chunk: GenerationChunk, first: bool, with_usage: bool) -> dict:
        reason = None if chunk.finish_reason is None else finish_json(chunk.finish_reason)
        if self.chat:
            delta = {"role": "assistant", "content": chunk.text} if first else {"content": chunk.text}
            body = {"delta": delta}
        else:
            body = {"text": chunk.text}
        choice = {"index": index, **body, "logprobs": self.logprobs(chunk.logprobs), "finish_reason": reason}
        message = {"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model,
                   "choices": [choice]}
        return {**message, "usage": None} if with_usage else message

    def usage_chunk(self, usage: Usage) -> dict:
        return {"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model,
                "choices": [], "usage": usage_json(usage)}


async def run_whole(engine, request: GenerationRequest):
    async with contextlib.aclosing(engine.generate(request)) as chunks:
        return await collect(chunks)


async def stream_response(engine, requests: list[GenerationRequest], shapes: Shapes, include_usage: bool,
                          admission: contextlib.ExitStack) -> EventSourceResponse:
    """SSE: `data: {chunk}` per delta of every choice, the usage chunk if asked for, then `data: [DONE]`. The first
    chunk is awaited here, so a refusal still gets its own status; `admission` is released when the stream ends."""
    chunks = merged([engine.generate(r) for r in requests])
    try:
        first = await anext(chunks)
        if first[1].finish_reason is FinishReason.DEADLINE:  # out of time before any token: a 504, not a 200
            raise TimeoutError("the request's deadline passed before its first token")
    except BaseException:
        await chunks.aclose()
        raise

    async def events() -> AsyncIterator[dict]:
        seen: set[int] = set()
        prompt_tokens = completion_tokens = 0
        try:
            index, chunk = first
            while True:
                yield {"data": json.dumps(shapes.chunk(index, chunk, index not in seen, include_usage))}
                seen.add(index)
                if chunk.finished:
                    prompt_tokens += chunk.usage.prompt_tokens
                    completion_tokens += chunk.usage.completion_tokens
                index, chunk = await anext(chunks)
        except StopAsyncIteration:
            if include_usage:
                yield {"data": json.dumps(shapes.usage_chunk(Usage(prompt_tokens, completion_tokens)))}
        except Exception as exc:  # noqa: BLE001 - after the 200: the error travels as an event, as vLLM sends it
            yield {"data": json.dumps(describe(exc)[1])}
        finally:
            await chunks.aclose()
            admission.close()
        yield {"data": "[DONE]"}

    return EventSourceResponse(events(), ping=15, headers={"Cache-Control": "no-cache"})


def build_app(ctx: HttpContext) -> FastAPI:
    app = FastAPI(title="prunefusion", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(f"{request.method} {request.url.path}: {exc.detail}", kind),
                            status_code=exc.status_code)

    def admit(request: Request, service: str, model: str | None) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        if ctx.access is not None:
            request.state.key_name = stack.enter_context(
                ctx.access.http_call(request.headers.getlist("authorization"), service, model))
        return stack

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        serving = ctx.ready()
        return JSONResponse({"ready": serving}, status_code=200 if serving else 503)

    @app.get("/v1/models")
    @openai_errors
    async def models(request: Request):
        with admit(request, TEXT_SERVICE, None):
            infos = [info for task in ("text", "multimodal", "embedding") for info in ctx.registry.infos(task)]
            return {"object": "list", "data": [
                {"id": i.name, "object": "model", "created": ctx.started, "owned_by": "prunefusion",
                 "max_model_len": i.context_length} for i in infos]}

    async def text_route(request: Request, schema, chat: bool):
        req = parse(schema, await read_json(request, ctx.max_body_bytes))
        prompts = None if chat else req.prompts()
        admission = admit(request, TEXT_SERVICE, req.model)
        streaming = False
        try:
            engine = ctx.registry.get(req.model)
            if chat:
                prompts = [engine.chat_prompt(req.chat_messages())]
            params = req.sampling(engine.info.default_max_new_tokens)
            request_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
            shapes = Shapes(chat, engine.info.name, request_id, int(time.time()))
            # choice index = prompt index * n + sample index, as OpenAI numbers them
            deadline = request_deadline(request)
            requests = [sample for i, p in enumerate(prompts) for sample in sample_requests(GenerationRequest(
                f"{request_id}-{i}" if len(prompts) > 1 else request_id, p if isinstance(p, str) else "", params,
                stream=req.stream, prompt_ids=() if isinstance(p, str) else p, cache=CachePolicy(req.cache),
                deadline=deadline), req.n)]
            if req.stream:
                response = await stream_response(engine, requests, shapes, req.include_usage, admission)
                streaming = True
                return response
            try:
                async with asyncio.TaskGroup() as group:  # one failure cancels the other choices
                    tasks = [group.create_task(run_whole(engine, r)) for r in requests]
            except ExceptionGroup as failed:  # the first error is the answer
                raise failed.exceptions[0] from None
            return shapes.whole([t.result() for t in tasks])
        finally:
            if not streaming:
                admission.close()

    @app.post("/v1/completions")
    @openai_errors
    async def completions(request: Request):
        return await text_route(request, CompletionRequest, chat=False)

    @app.post("/v1/chat/completions")
    @openai_errors
    async def chat_completions(request: Request):
        return await text_route(request, ChatCompletionRequest, chat=True)

    @app.post("/v1/images/generations")
    @openai_errors
    async def images(request: Request):
        req = parse(ImageRequest, await read_json(request, ctx.max_body_bytes))
        with admit(request, IMAGE_SERVICE, req.model):
            engine = ctx.registry.get(req.model, task="multimodal")
            limits = engine.limits
            engine.check_prompt(req.prompt)
            size = check_output_size(image_size(req.size), limits.image_size, limits.max_size)
            steps, guidance, seed = image_settings(limits, req.steps, req.guidance_scale, req.seed)
            results = await asyncio.gather(*(engine.generate_image(
                ImageGenerationRequest(req.prompt, steps, guidance, seed + i)) for i in range(req.n)))
            return {"created": int(time.time()), "data": [
                {"b64_json": base64.b64encode(encode_png(r.pixels, size)[0]).decode("ascii")} for r in results]}

    from prunefusion.server.openai.embeddings import add_embedding_routes  # POST /v1/embeddings
    add_embedding_routes(app, ctx, admit)
    return app


def image_size(size: str | None) -> int | None:
    """OpenAI's "WxH" (square only) as one side, or None for the model's native size."""
    if size is None:
        return None
    width, _, height = size.partition("x")
    if not (width.isdigit() and width == height):
        raise InvalidRequestError("size", f"must be a square 'NxN' size, got {size[:32]!r}")
    return int(width)
