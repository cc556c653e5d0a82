"""The one small async interface every engine implements, and the plain dataclasses it speaks.

Protobuf never reaches this module: servicers translate requests into `GenerationRequest` and engine outputs
(`GenerationChunk`) back into messages.
"""

from __future__ import annotations

import abc
import enum
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field


class FinishReason(enum.Enum):
    LENGTH = "length"
    STOP = "stop"
    EOS = "eos"
    CANCELLED = "cancelled"
    DEADLINE = "deadline"


class InvalidRequestError(ValueError):
    """Bad input. `field` names the request field at fault (mapped to INVALID_ARGUMENT)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class QueueFullError(RuntimeError):
    """The admission queue is full (mapped to RESOURCE_EXHAUSTED)."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineUnavailableError(RuntimeError):
    """The engine is not accepting requests (starting, draining or stopped; mapped to UNAVAILABLE)."""


GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature < 1e-5 means greedy; top_k == 0 and top_p == 1 disable those filters."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        # as in vLLM: a temperature this small would overflow the scaled logits; it means "take the argmax"
        return self.temperature < GREEDY_BELOW_TEMPERATURE


@dataclass
class GenerationRequest:
    request_id: str
    prompt: str
    params: SamplingParams
    # time.monotonic() of arrival and of the deadline (None: no deadline).
    arrival: float = field(default_factory=time.monotonic)
    deadline: float | None = None


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Timings:
    queue_seconds: float
    time_to_first_token_seconds: float
    total_seconds: float


@dataclass(frozen=True)
class GenerationChunk:
    """A delta of one request's output. The last chunk has `finish_reason`, `usage` and `timings` set."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    timings: Timings | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class GenerationResult:
    """A whole output: the concatenation of a request's chunks (see `collect`)."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    usage: Usage
    timings: Timings


async def collect(chunks: AsyncIterator[GenerationChunk]) -> GenerationResult:
    """Concatenate a stream into one result; unary calls are defined as this, so stream == unary by construction."""
    texts: list[str] = []
    ids: list[int] = []
    async for chunk in chunks:
        texts.append(chunk.text)
        ids.extend(chunk.token_ids)
        if chunk.finished:
            assert chunk.usage is not None and chunk.timings is not None and chunk.finish_reason is not None
            return GenerationResult(chunk.request_id, "".join(texts), tuple(ids), chunk.finish_reason,
                                    chunk.usage, chunk.timings)
    raise RuntimeError("engine stream ended without a final chunk")


@dataclass(frozen=True)
class ModelInfo:
    name: str
    family: str
    num_layers: int
    num_parameters: int
    weights_digest: str
    engine: str
    context_length: int
    max_new_tokens_limit: int
    default_max_new_tokens: int
    path: str
    tokenizer_digest: str = ""
    config_digest: str = ""  # config.json + generation_config.json (EOS ids, ...)
    device: str = ""  # device type the engine runs on ("cpu", "cuda")
    dtype: str = ""


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    healthy: bool


class Engine(abc.ABC):
    """Submit a request, stream its chunks, abort it, ask for health. One instance serves one model."""

    info: ModelInfo

    @abc.abstractmethod
    async def start(self) -> None:
        """Load and warm up; after it returns the engine accepts requests."""

    @abc.abstractmethod
    async def shutdown(self) -> None:
        """Stop accepting requests, cancel what is left, release resources."""

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Submit and stream. Raises QueueFullError / EngineUnavailableError / InvalidRequestError at the first
        iteration. Closing the iterator early (or cancelling its consumer) aborts the request."""

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None:
        """Abort a queued or running request; its slot is free before the next decode step."""

    @abc.abstractmethod
    def stats(self) -> EngineStats:
        """Current load and health."""
