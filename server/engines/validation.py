"""Checks every engine applies to a request before it is queued; each error names the request field."""

from __future__ import annotations

import math
import random

from prunefusion.server.engines.base import GenerationRequest, ImageLimits, InvalidRequestError, SamplingParams

MAX_TEMPERATURE = 2.0  # as in vLLM and the OpenAI API: every engine accepts the same range
MAX_GUIDANCE_SCALE = 50.0  # classifier-free guidance: a request's range, and the bound on a model's default
MAX_STOP_SEQUENCES = 16
MAX_STOP_LENGTH = 256
MAX_PENALTY = 2.0  # presence and frequency penalties: OpenAI's range
MAX_REPETITION_PENALTY = 10.0
MAX_LOGPROBS = 20  # top alternatives per token (OpenAI's top_logprobs limit)


def check_sampling_params(params: SamplingParams, max_new_tokens_limit: int) -> None:
    if not 1 <= params.max_new_tokens <= max_new_tokens_limit:
        raise InvalidRequestError("max_new_tokens",
                                  f"must be in [1, {max_new_tokens_limit}], got {params.max_new_tokens}")
    if not (math.isfinite(params.temperature) and 0 <= params.temperature <= MAX_TEMPERATURE):
        raise InvalidRequestError("temperature", f"must be in [0, {MAX_TEMPERATURE}], got {params.temperature}")
    if not 0 < params.top_p <= 1:
        raise InvalidRequestError("top_p", f"must be in (0, 1], got {params.top_p}")
    if params.top_k < 0:
        raise InvalidRequestError("top_k", f"must be >= 0 (0 disables it), got {params.top_k}")
    if params.seed is not None and not 0 <= params.seed < 2**63:
        raise InvalidRequestError("seed", f"must be in [0, 2**63), got {params.seed}")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(params, name)
        if not (math.isfinite(value) and -MAX_PENALTY <= value <= MAX_PENALTY):
            raise InvalidRequestError(name, f"must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {value}")
    if not (math.isfinite(params.repetition_penalty) and 0 < params.repetition_penalty <= MAX_REPETITION_PENALTY):
        raise InvalidRequestError("repetition_penalty", f"must be in (0, {MAX_REPETITION_PENALTY:g}] (1 is off), "
                                                        f"got {params.repetition_penalty}")
    if not 0 <= params.min_new_tokens <= params.max_new_tokens:
        raise InvalidRequestError("min_new_tokens", f"must be in [0, max_new_tokens ({params.max_new_tokens})], "
                                                    f"got {params.min_new_tokens}")
    if params.logprobs is not None and not 0 <= params.logprobs <= MAX_LOGPROBS:
        raise InvalidRequestError("logprobs", f"must be in [0, {MAX_LOGPROBS}] top alternatives, got {params.logprobs}")
    if len(params.stop) > MAX_STOP_SEQUENCES:
        raise InvalidRequestError("stop", f"at most {MAX_STOP_SEQUENCES} sequences, got {len(params.stop)}")
    for s in params.stop:
        if not 1 <= len(s) <= MAX_STOP_LENGTH:
            raise InvalidRequestError("stop", f"each sequence must have 1..{MAX_STOP_LENGTH} characters, got {len(s)}")


def check_request(request: GenerationRequest, max_new_tokens_limit: int) -> None:
    """Everything that can be checked without the tokenizer."""
    if request.prompt and request.prompt_ids:
        raise InvalidRequestError("prompt", "give a prompt or prompt token ids, not both")
    if not request.prompt and not request.prompt_ids:
        raise InvalidRequestError("prompt", "must not be empty")
    check_sampling_params(request.params, max_new_tokens_limit)


def check_prompt_length(prompt_tokens: int, max_new_tokens: int, context_length: int) -> None:
    if prompt_tokens == 0:
        raise InvalidRequestError("prompt", "encodes to no tokens")
    if prompt_tokens >= context_length:
        raise InvalidRequestError("prompt",
                                  f"has {prompt_tokens} tokens; the model's context is {context_length} tokens")
    if prompt_tokens + max_new_tokens > context_length:
        raise InvalidRequestError(
            "max_new_tokens", f"prompt ({prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
            f"model's context of {context_length} tokens; ask for at most {context_length - prompt_tokens}")


def in_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise InvalidRequestError(name, f"must be in [{low:g}, {high:g}]; got {value:g}")


def image_settings(limits: ImageLimits, steps: int | None, guidance_scale: float | None,
                   seed: int | None) -> tuple[int, float, int]:
    """A request's diffusion settings with the model's defaults filled in, checked (a random seed if none)."""
    steps = limits.default_steps if steps is None else steps
    guidance_scale = limits.default_guidance_scale if guidance_scale is None else guidance_scale
    in_range("steps", steps, 1, limits.max_steps)
    in_range("guidance_scale", guidance_scale, 0.0, MAX_GUIDANCE_SCALE)
    return steps, guidance_scale, random.getrandbits(63) if seed is None else seed
