"""Prompt checks and tokenization shared by the text engines, so that every engine refuses the same requests with
the same messages and encodes prompts the same way."""

from __future__ import annotations

import asyncio
import copy
import threading

from prunefusion.server.engines.base import GenerationRequest, InvalidRequestError
from prunefusion.server.engines.validation import check_prompt_length, check_request

INLINE_TOKENIZE_CHARS = 8192  # longer prompts are tokenized off the event loop


class PromptEncoder:
    """Validates a request and encodes its prompt without stalling the event loop.

    It encodes with its own copy of the tokenizer, under a lock: an engine thread may decode with the original at
    the same time, and transformers may change a tokenizer's truncation state on encode."""

    def __init__(self, tokenizer, *, context_length: int, max_token_chars: int, max_new_tokens_limit: int):
        self._tokenizer = copy.deepcopy(tokenizer)
        self._lock = threading.Lock()
        self.context_length = context_length
        self.max_token_chars = max_token_chars
        self.max_new_tokens_limit = max_new_tokens_limit

    def encode_now(self, text: str) -> list[int]:
        with self._lock:
            return self._tokenizer(text, add_special_tokens=True)["input_ids"]

    async def encode(self, request: GenerationRequest) -> list[int]:
        """The prompt's token ids, after every check: a prompt longer than any that could fit the context is refused
        from its length alone, a long one is tokenized in a thread."""
        check_request(request, self.max_new_tokens_limit)
        if request.prompt_ids:
            return self.check_ids(request)
        chars = len(request.prompt)
        if chars > self.context_length * self.max_token_chars:
            raise InvalidRequestError("prompt", f"has {chars} characters, more than {self.context_length} "
                                                "tokens (the model's context) can hold")
        ids = (self.encode_now(request.prompt) if chars <= INLINE_TOKENIZE_CHARS
               else await asyncio.to_thread(self.encode_now, request.prompt))
        check_prompt_length(len(ids), request.params.max_new_tokens, self.context_length)
        return ids

    def check_ids(self, request: GenerationRequest) -> list[int]:
        """A prompt given as token ids: each must be in the tokenizer's vocabulary; used as is (no BOS added)."""
        vocabulary = len(self._tokenizer)
        bad = next((i for i in request.prompt_ids if not 0 <= i < vocabulary), None)
        if bad is not None:
            raise InvalidRequestError("prompt_token_ids", f"token id {bad} is outside the vocabulary [0, {vocabulary})")
        ids = list(request.prompt_ids)
        check_prompt_length(len(ids), request.params.max_new_tokens, self.context_length)
        return ids
