"""OpenAI request bodies, strictly parsed: an unknown parameter is a 400 naming it, never silently ignored.

Parameters OpenAI (or vLLM) defines that this server cannot honour yet are refused by name unless they carry their
no-op value (`NOT_YET`), so a client that sends `"n": 1` or `"logprobs": null` works, and one that asks for real
logprobs hears that it cannot have them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from prunefusion.errors import InvalidRequestError
from prunefusion.server.engines.base import SamplingParams
from prunefusion.server.engines.chat import ChatMessage

# parameter -> the values that change nothing (accepted); any other value is refused, naming the parameter
NOT_YET: dict[str, tuple] = {
    "best_of": (None, 1),
    "echo": (None, False),
    "logit_bias": (None, {}),
    "suffix": (None, ""),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "parallel_tool_calls": (None,),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
}
# the engines' field names (engines/validation.py) as OpenAI calls them, for error messages
PARAM_NAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "prompt_token_ids": "prompt"}
MAX_USER_CHARS = 256


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False)


class StreamOptions(Strict):
    include_usage: bool = False


class Sampling(Strict):
    """What completions and chat share. Defaults are OpenAI's (temperature 1: sampled); top_k is vLLM's extra."""

    model: Annotated[str, Field(max_length=256)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # vLLM: -1 or 0 turn it off
    stop: str | list[str] | None = None
    seed: int | None = None
    user: Annotated[str, Field(max_length=MAX_USER_CHARS)] | None = None  # accepted; the access log has the key
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # vLLM's extra
    min_tokens: int = 0  # vLLM's extra
    ignore_eos: bool = False  # vLLM's extra
    cache: Literal["default", "bypass", "refresh"] = "default"  # prunefusion: the response cache's policy

    def top_logprobs_count(self) -> int | None:
        """How many alternatives per token the request asks for (None: no logprobs)."""
        return None

    def sampling(self, default_max_new_tokens: int, max_tokens: int | None = None) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_new_tokens=max_tokens or self.max_tokens or default_max_new_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k is None or self.top_k == -1 else self.top_k,
            seed=self.seed, stop=stop, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, repetition_penalty=self.repetition_penalty,
            min_new_tokens=self.min_tokens, ignore_eos=self.ignore_eos, logprobs=self.top_logprobs_count())

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None  # alternatives per token (OpenAI allows up to 5; this server up to 20)

    def top_logprobs_count(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[str | tuple[int, ...]]:
        """Each prompt: text, or token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise InvalidRequestError("prompt", "must not be empty")
        if isinstance(prompt[0], int):  # one prompt of token ids
            return [tuple(prompt)]
        return [p if isinstance(p, str) else tuple(p) for p in prompt]


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: str
    content: str | list[TextPart] | None = None
    name: Annotated[str, Field(max_length=64)] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(Sampling):
    messages: list[Message]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: int | None = None

    def top_logprobs_count(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs", "needs logprobs: true")
        return (self.top_logprobs or 0) if self.logprobs else None

    def chat_messages(self) -> list[ChatMessage]:
        return [ChatMessage(m.role, m.text()) for m in self.messages]

    def sampling(self, default_max_new_tokens: int, max_tokens: int | None = None) -> SamplingParams:
        return super().sampling(default_max_new_tokens, self.max_completion_tokens)


class ImageRequest(Strict):
    prompt: str
    model: Annotated[str, Field(max_length=256)] = ""
    n: Annotated[int, Field(ge=1, le=8)] = 1
    size: str | None = None  # "WxH", square; default: the model's native size
    response_format: Literal["b64_json"] = "b64_json"
    seed: int | None = None  # prunefusion: the sampler's seed (default 0)
    steps: int | None = None  # prunefusion: diffusion steps (default: the model's)
    guidance_scale: float | None = None  # prunefusion
    user: Annotated[str, Field(max_length=MAX_USER_CHARS)] | None = None


def refuse_not_yet(body: dict[str, Any], fields: dict) -> dict[str, Any]:
    """The body without the not-yet-supported parameters that carry their no-op value; any other value of one is
    an InvalidRequestError naming it. A parameter the request model has (`fields`) is its own business."""
    for name, noops in NOT_YET.items():
        if name in body and name not in fields:
            value = body[name]
            if value not in noops:
                raise InvalidRequestError(name, f"is not supported by this server yet (accepted only as "
                                                f"{' or '.join(map(repr, noops))}), got {str(value)[:64]}")
    return {k: v for k, v in body.items() if k not in NOT_YET or k in fields}


def parse(model: type[Strict], body: object) -> Strict:
    """`body` (decoded JSON) as `model`; the first problem as an InvalidRequestError naming the parameter."""
    if not isinstance(body, dict):
        raise InvalidRequestError("body", "must be a JSON object")
    try:
        return model.model_validate(refuse_not_yet(body, model.model_fields))
    except ValidationError as err:
        problem = err.errors()[0]
        param = ".".join(str(p) for p in problem["loc"] if not str(p).startswith(("str", "list[", "int")))
        message = ("unknown parameter" if problem["type"] == "extra_forbidden" else problem["msg"])
        raise InvalidRequestError(param or "body", message) from None
