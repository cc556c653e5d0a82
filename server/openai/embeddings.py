"""POST /v1/embeddings: OpenAI's embeddings endpoint over the same embedding engines as gRPC's Embeddings.Embed.

    {"model", "input": str | [str], "encoding_format": "float" | "base64", "dimensions", "user"}
    -> {"object": "list", "data": [{"object": "embedding", "index", "embedding"}], "model", "usage"}

Refused with a 400 naming the parameter: token-id input (`input` as integers: this server tokenizes itself),
`dimensions` other than the model's (the vectors are not Matryoshka-trained, so a prefix is not an embedding), and
every unknown parameter. `base64` is the float32 vector's little-endian bytes, as OpenAI sends it (the official
client asks for it by default and decodes it).
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Annotated, Literal

import numpy as np
from fastapi import FastAPI, Request
from pydantic import Field

from prunefusion.server.engines.base import InvalidRequestError
from prunefusion.server.openai.schemas import MAX_USER_CHARS, Strict, parse

EMBEDDINGS_SERVICE = "prunefusion.v1.Embeddings"


class EmbeddingRequest(Strict):
    model: Annotated[str, Field(max_length=256)]
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1)] | None = None
    user: Annotated[str, Field(max_length=MAX_USER_CHARS)] | None = None


def parse_embedding_request(body: object) -> EmbeddingRequest:
    """The body as an EmbeddingRequest; token ids (integers, or lists of them) are refused by name first."""
    if isinstance(body, dict):
        value = body.get("input")
        items = value if isinstance(value, list) else [value]
        if any(isinstance(x, int | list) and not isinstance(x, bool) for x in items):
            raise InvalidRequestError("input", "token-id input is not supported: send a string or a list of strings")
    return parse(EmbeddingRequest, body)


def encode_vector(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


def as_openai_field(err: InvalidRequestError) -> InvalidRequestError:
    """The engine's `texts` / `texts[i]` as OpenAI's `input` / `input[i]`."""
    if err.field.startswith("texts"):
        field = "input" + err.field.removeprefix("texts")
        return InvalidRequestError(field, str(err).removeprefix(f"{err.field}: "))
    return err


def add_embedding_routes(app: FastAPI, ctx, admit: Callable) -> None:
    """Wire POST /v1/embeddings into `app` (routes.build_app): `ctx` is its HttpContext, `admit` its key check."""
    from prunefusion.server.openai.routes import openai_errors, read_json

    @app.post("/v1/embeddings")
    @openai_errors
    async def embeddings(request: Request):
        req = parse_embedding_request(await read_json(request, ctx.max_body_bytes))
        texts = [req.input] if isinstance(req.input, str) else req.input
        with admit(request, EMBEDDINGS_SERVICE, req.model):
            engine = ctx.registry.get(req.model, task="embedding")
            dims = engine.limits.dimensions
            if req.dimensions is not None and req.dimensions != dims:
                raise InvalidRequestError("dimensions", f"model {engine.name!r} makes {dims}-dimensional vectors "
                                                        f"only, got {req.dimensions}")
            try:
                result = await engine.embed(texts)
            except InvalidRequestError as err:
                raise as_openai_field(err) from None
            return {"object": "list", "model": engine.name,
                    "data": [{"object": "embedding", "index": i, "embedding": encode_vector(v, req.encoding_format)}
                             for i, v in enumerate(result.vectors)],
                    "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}}
