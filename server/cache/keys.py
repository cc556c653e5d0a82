"""Response-cache keys: sha256 over a canonical serialization of everything that changes the output (pure)."""

from __future__ import annotations

import hashlib
import json

from prunefusion.server.engines.base import ModelInfo, SamplingParams

API_VERSION = "prunefusion.v1"
KEY_SCHEMA = 4  # bump when the serialization below changes, so old entries are never read


def is_deterministic(params: SamplingParams) -> bool:
    """Only these requests are cached: greedy decoding, or sampling with an explicit seed; and not when logprobs
    are asked for (an entry holds text and token ids only)."""
    return (params.greedy or params.seed is not None) and params.logprobs is None


def cache_key(kind: str, model: ModelInfo, prompt: str, params: SamplingParams, prompt_ids: tuple[int, ...] = ()
              ) -> str:
    """Hex sha256 of the canonical JSON of (schema, API version, request kind, model identity, prompt, parameters).

    The model identity is its name plus the digests of its weights, tokenizer and config (EOS ids live there), so a
    re-pruned or re-healed model never hits the entries of its previous weights; the runtime (engine, device type,
    dtype) is included because it changes floating-point results, so replicas sharing a Redis on other hardware
    or dtypes keep separate entries. Every sampling parameter is included, the seed too (greedy requests keep it:
    it cannot change their output, but a client that sends one sees it honoured). The model's limits (context
    length, max_new_tokens_limit) are included too: the cache does not validate requests (the engine does, once),
    and with every input of the checks in the key, only a request valid under these limits can hit an entry, which
    exists only because an identical request passed them and ran.
    """
    canonical = {
        "schema": KEY_SCHEMA,
        "api": API_VERSION,
        "kind": kind,
        "model": {"name": model.name, "weights": model.weights_digest, "tokenizer": model.tokenizer_digest,
                  "config": model.config_digest},
        "runtime": {"engine": model.engine, "device": model.device, "dtype": model.dtype},
        "limits": {"context_length": model.context_length, "max_new_tokens_limit": model.max_new_tokens_limit},
        "prompt": prompt,
        "prompt_ids": list(prompt_ids),
        "params": {"max_new_tokens": params.max_new_tokens, "temperature": params.temperature,
                   "top_p": params.top_p, "top_k": params.top_k, "seed": params.seed, "stop": list(params.stop),
                   "presence_penalty": params.presence_penalty, "frequency_penalty": params.frequency_penalty,
                   "repetition_penalty": params.repetition_penalty, "min_new_tokens": params.min_new_tokens,
                   "ignore_eos": params.ignore_eos},
    }
    blob = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()
