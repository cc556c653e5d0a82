"""The small async interfaces engines implement, and the plain dataclasses they speak.

Two contracts: `Engine` (text: submit a `GenerationRequest`, stream `GenerationChunk`s) and `ImageEngine` (images,
captions and interleaved text+image parts). Both share `ServingEngine`'s lifecycle (start, shutdown, stats) and
say which service they belong to (`task`), so the registry needs no table of engine kinds beside the config's.
Protobuf and JSON never reach this module: front ends translate requests into these dataclasses and back.
"""

from __future__ import annotations

import abc
import enum
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

# defined below every layer (prunefusion/errors.py), part of this module's vocabulary for the engines
from prunefusion.errors import InvalidRequestError  # noqa: F401
from prunefusion.server.engines.chat import ChatMessage  # noqa: F401 - part of the vocabulary too

if TYPE_CHECKING:
    import numpy as np


class FinishReason(enum.Enum):
    LENGTH = "length"
    STOP = "stop"
    EOS = "eos"
    CANCELLED = "cancelled"
    DEADLINE = "deadline"


class CacheSource(enum.Enum):
    """Where a response came from, for dashboards that tell the cache's two savings apart."""

    NONE = "none"  # the model ran for this request
    STORED = "stored"  # a response-cache entry an earlier run stored (on this replica or another)
    SHARED = "shared"  # an identical request that ran at the same time (here, or on another replica: Redis lock)


class CachePolicy(enum.Enum):
    """What the response cache (server/cache/service.py) may do with a deterministic request."""

    DEFAULT = "default"  # replay a stored result, else run and store it
    BYPASS = "bypass"  # neither read nor write the cache
    REFRESH = "refresh"  # run the model and overwrite the entry


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
    # OpenAI's: logit - frequency * count - presence * [count > 0], over the tokens generated so far
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # vLLM's and transformers': a token seen in the prompt or the output has its logit divided by it (if positive)
    # or multiplied by it (if negative); 1 is off
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0  # EOS is masked and stop sequences are not looked for until this many tokens
    ignore_eos: bool = False  # EOS is an ordinary token: generation runs to max_new_tokens or a stop sequence
    logprobs: int | None = None  # report each token's log-probability and this many top alternatives (0: none)

    @property
    def greedy(self) -> bool:
        # as in vLLM: a temperature this small would overflow the scaled logits; it means "take the argmax"
        return self.temperature < GREEDY_BELOW_TEMPERATURE

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1)


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability under the model (log_softmax of its raw logits: before temperature,
    penalties and filters, as vLLM reports them), with the most likely tokens at that step (id, text, logprob)."""

    token_id: int
    token: str
    logprob: float
    top: tuple[tuple[int, str, float], ...] = ()


@dataclass
class GenerationRequest:
    request_id: str
    prompt: str  # empty when prompt_ids is given
    params: SamplingParams
    # time.monotonic() of arrival and of the deadline (None: no deadline).
    arrival: float = field(default_factory=time.monotonic)
    deadline: float | None = None
    cache: CachePolicy = CachePolicy.DEFAULT  # read by the cache wrapper; engines ignore it
    # False: the caller folds the stream into one result (unary), so a cached hit may be replayed as one chunk
    stream: bool = True
    prompt_ids: tuple[int, ...] = ()  # a prompt given as token ids (then `prompt` is empty)


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
    cache_source: CacheSource = CacheSource.NONE  # not NONE: replayed, not produced by the model for this request
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token id, when the request asked for them

    @property
    def cached(self) -> bool:
        return self.cache_source is not CacheSource.NONE

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
    cache_source: CacheSource = CacheSource.NONE
    logprobs: tuple[TokenLogprob, ...] = ()

    @property
    def cached(self) -> bool:
        return self.cache_source is not CacheSource.NONE


async def collect(chunks: AsyncIterator[GenerationChunk]) -> GenerationResult:
    """Concatenate a stream into one result; unary calls are defined as this, so stream == unary by construction."""
    texts: list[str] = []
    ids: list[int] = []
    logprobs: list[TokenLogprob] = []
    async for chunk in chunks:
        texts.append(chunk.text)
        ids.extend(chunk.token_ids)
        logprobs.extend(chunk.logprobs)
        if chunk.finished:
            assert chunk.usage is not None and chunk.timings is not None and chunk.finish_reason is not None
            return GenerationResult(chunk.request_id, "".join(texts), tuple(ids), chunk.finish_reason,
                                    chunk.usage, chunk.timings, chunk.cache_source, tuple(logprobs))
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


class ServingEngine(abc.ABC):
    """The lifecycle every engine shares. One instance serves one model; `task` names the service it answers."""

    task: ClassVar[str]  # "text" (TextGeneration) or "multimodal" (Multimodal)
    name: str
    info: ModelInfo | None  # set by start()

    @abc.abstractmethod
    async def start(self) -> None:
        """Load and warm up; after it returns the engine accepts requests."""

    @abc.abstractmethod
    async def shutdown(self) -> None:
        """Stop accepting requests, end what is left, release resources."""

    @abc.abstractmethod
    def stats(self) -> EngineStats:
        """Current load and health."""


class Engine(ServingEngine):
    """A text engine: submit a request and stream its chunks."""

    task = "text"

    def chat_prompt(self, messages: Sequence[ChatMessage]) -> str:
        """The prompt that asks the model to answer `messages` (its chat template); InvalidRequestError if it has
        none or the messages are malformed."""
        raise InvalidRequestError("messages", f"model {self.name!r} does not take chat messages")

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Submit and stream. Raises QueueFullError / EngineUnavailableError / InvalidRequestError at the first
        iteration. Closing the iterator early (or cancelling its consumer) aborts the request: its slot is free
        before the next decode step."""


# ---- images -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageLimits:
    """What an image model accepts, fixed when it starts (front ends validate requests and list models with it)."""

    image_size: int  # native square size of generated images and of caption inputs
    max_size: int  # largest output size and largest accepted input image
    max_steps: int
    default_steps: int
    default_guidance_scale: float
    max_caption_tokens: int
    max_batch_size: int
    max_wait_seconds: float


@dataclass(frozen=True)
class ImageGenerationRequest:
    prompt: str  # checked by ImageEngine.check_prompt
    steps: int
    guidance_scale: float
    seed: int
    deadline: float | None = None  # time.monotonic()


@dataclass(frozen=True)
class CaptionRequest:
    image: np.ndarray  # uint8 [image_size, image_size, 3] (prunefusion.images.decode_image)
    max_tokens: int
    deadline: float | None = None


@dataclass(frozen=True)
class InterleavedRequest:
    prompt: str
    max_tokens: int
    max_images: int
    steps: int
    guidance_scale: float
    seed: int
    deadline: float | None = None


@dataclass(frozen=True)
class ImageResult:
    pixels: np.ndarray  # uint8 [H, W, 3]
    queue_seconds: float
    batch_size: int  # requests that shared the sampler call


@dataclass(frozen=True)
class CaptionResult:
    text: str
    queue_seconds: float
    batch_size: int


@dataclass(frozen=True)
class TextPart:
    text: str


@dataclass(frozen=True)
class ImagePart:
    pixels: np.ndarray  # uint8 [H, W, 3]


class ImageEngine(ServingEngine):
    """A text+image engine: images from prompts, captions of images, interleaved text and images."""

    task = "multimodal"
    limits: ImageLimits  # set by start()

    @abc.abstractmethod
    def check_prompt(self, prompt: str, field_name: str = "prompt") -> None:
        """Raise InvalidRequestError(field_name, ...) when the model cannot take this prompt."""

    @abc.abstractmethod
    async def generate_image(self, request: ImageGenerationRequest) -> ImageResult:
        """Raises TimeoutError when the deadline passes first, QueueFullError / EngineUnavailableError on overload or
        shutdown. Cancelling the await stops the request's work at the next step."""

    @abc.abstractmethod
    async def caption(self, request: CaptionRequest) -> CaptionResult:
        """The caption, at most `max_tokens` words; errors as for generate_image."""

    @abc.abstractmethod
    def interleaved(self, request: InterleavedRequest) -> AsyncIterator[TextPart | ImagePart]:
        """Text and images as the model emits them; closing the iterator stops the model's work at its next step."""


# ---- embeddings ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EmbeddingLimits:
    """What an embedding model accepts, fixed when it starts."""

    dimensions: int  # length of each vector
    max_tokens: int  # per text, [CLS] and [SEP] included; longer texts are truncated (or refused: `truncate`)
    truncate: bool
    max_inputs: int  # texts per request
    max_batch_size: int  # texts per forward pass
    max_wait_seconds: float


@dataclass(frozen=True)
class EmbeddingResult:
    vectors: np.ndarray  # float32 [len(texts), dimensions], unit L2 norm, in the order of the texts
    prompt_tokens: int  # tokens the model read (after truncation), summed over the texts
    queue_seconds: float
    batch_size: int  # requests that shared the model call (itself included)
    batch_texts: int  # texts in that call


class EmbeddingEngine(ServingEngine):
    """A sentence encoder: texts in, mean-pooled, L2-normalised vectors out (as sentence-transformers computes)."""

    task = "embedding"
    limits: EmbeddingLimits  # set by start()

    @abc.abstractmethod
    async def embed(self, texts: Sequence[str], deadline: float | None = None) -> EmbeddingResult:
        """Raises InvalidRequestError naming `texts` (or `texts[i]`) for empty input, too many texts or (with
        truncate off) a text that is too long; QueueFullError / EngineUnavailableError / TimeoutError as the
        other engines do."""
