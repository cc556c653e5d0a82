"""Incremental detokenization with stop sequences, and the one rule for when a text request ends.

Deltas are decoded the way vLLM and TGI do it: decode a small window that starts a few tokens back (so tokenizers
that drop a leading space on a lone token still give the right text) and emit only what is new once it no longer
ends in an incomplete UTF-8 character. Text that could be the start of a stop sequence is held back until it is
known not to be one, so a stop sequence is never streamed and the concatenation of deltas is the final text.

`IncrementalText.accept(token)` is what every text engine calls per sampled token: EOS, then a stop sequence, then
the length limit end the request, in that order.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from prunefusion.server.engines.base import FinishReason

PROMPT_CONTEXT_TOKENS = 5  # prompt tokens kept as left context for the first decode window


def held_back_length(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop sequence."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


def find_stop(text: str, stops: Sequence[str], search_from: int) -> int:
    """Index of the earliest stop-sequence match that ends after `search_from`, or -1."""
    hits = [i for stop in stops if (i := text.find(stop, max(0, search_from - len(stop) + 1))) >= 0]
    return min(hits, default=-1)


class IncrementalText:
    """Turns a growing list of token ids into text deltas, watching for stop sequences."""

    def __init__(self, tokenizer, prompt_ids: Sequence[int], stops: Sequence[str], *,
                 eos_token_ids: Collection[int] = frozenset(), max_new_tokens: int | None = None,
                 min_new_tokens: int = 0):
        self._tokenizer = tokenizer
        self._stops = tuple(stops)
        self._eos = eos_token_ids
        self._max_new_tokens = max_new_tokens
        self._min_new_tokens = min_new_tokens  # neither EOS nor a stop sequence ends the request before this many
        self.generated = 0  # tokens accepted
        self._ids: list[int] = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self.text = ""  # all decoded text so far (cut at a stop sequence once one matched)
        self._emitted = 0  # characters of `text` already handed out
        self.stopped = False

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def accept(self, token_id: int) -> tuple[str, FinishReason | None]:
        """Take one sampled token: the text to emit now and why the request ends here (None: it goes on). An EOS
        token adds no text and flushes what was pending."""
        self.generated += 1
        if token_id in self._eos and self.generated > self._min_new_tokens:
            return self.finish(), FinishReason.EOS
        delta = self.add(token_id)
        if self.stopped:
            return delta, FinishReason.STOP
        if self._max_new_tokens is not None and self.generated >= self._max_new_tokens:
            return delta + self.finish(), FinishReason.LENGTH
        return delta, None

    def add(self, token_id: int) -> str:
        """Append one token; return the text that may be emitted now (possibly empty)."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        if self._decode_pending(allow_partial_char=False):
            return self._take(len(self.text))
        return self._take(len(self.text) - held_back_length(self.text, self._stops))

    def finish(self) -> str:
        """Generation ended: decode what is pending (even an incomplete character) and return all unsent text."""
        if not self.stopped and self._read_offset < len(self._ids):
            self._decode_pending(allow_partial_char=True)
        return self._take(len(self.text))

    def _decode_pending(self, allow_partial_char: bool) -> bool:
        """Move newly decodable text into `self.text`; return True if a stop sequence matched."""
        prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full = self._decode(self._ids[self._prefix_offset:])
        if len(full) <= len(prefix) or (full.endswith("\ufffd") and not allow_partial_char):
            return False
        previous_length = len(self.text)
        self.text += full[len(prefix):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        looking = self._stops and self.generated >= self._min_new_tokens
        at = find_stop(self.text, self._stops, previous_length) if looking else -1
        if at >= 0:
            self.text = self.text[:at]
            self.stopped = True
        return self.stopped

    def _take(self, upto: int) -> str:
        delta = self.text[self._emitted:upto] if upto > self._emitted else ""
        self._emitted = max(self._emitted, upto)
        return delta
