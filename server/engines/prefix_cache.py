"""Exact prompt-prefix reuse for the slot path: the keys and values of prompts' full blocks, LRU-bounded.

A prompt is cut into blocks of BLOCK_TOKENS tokens; block i is named by a digest chained over every token from the
first through the end of block i (blake2b of the previous block's digest and this block's token ids), so a block is
reused only after exactly the same tokens. A hit copies the blocks into the new row's slot and the prefill computes
only the rest, so outputs are those of a full prefill (up to floating-point summation order). The last prompt token
is never taken from the cache: its logits give the first output token. The cache holds at most `max_tokens` tokens
(whole blocks); the least recently used block goes first, and a prompt's blocks are used last to first, so a
chain loses its tail before its head (a head without its tail still hits; a tail without its head never can). Only
the worker thread touches it. `store` reuses the digests `lookup` computed for the same prompt (one staged prompt
at a time, so the last lookup's is the one stored next).
"""

from __future__ import annotations

import array
import collections
import hashlib
from collections.abc import Callable, Sequence

import torch

BLOCK_TOKENS = 32
Block = tuple[torch.Tensor, torch.Tensor]  # keys, values [layers, kv heads, BLOCK_TOKENS, head dim]


def block_digests(tokens: Sequence[int], block_tokens: int = BLOCK_TOKENS) -> list[bytes]:
    """One digest per full block of `tokens`, each covering every token up to the block's end."""
    data = array.array("I", tokens).tobytes()  # 4 bytes per token id
    width = 4 * block_tokens
    digests, previous = [], b""
    for end in range(width, len(data) + 1, width):
        previous = hashlib.blake2b(previous + data[end - width:end], digest_size=16).digest()
        digests.append(previous)
    return digests


class PrefixCache:
    def __init__(self, max_tokens: int, block_tokens: int = BLOCK_TOKENS):
        self.block_tokens = block_tokens
        self.max_blocks = max_tokens // block_tokens
        self._blocks: collections.OrderedDict[bytes, Block] = collections.OrderedDict()
        self.hit_tokens = 0  # prompt tokens taken from the cache
        self.computed_tokens = 0  # prompt tokens prefilled by the model
        self._looked_up: tuple[Sequence[int], list[bytes]] = ((), [])  # the last lookup's prompt, its digests

    @property
    def tokens(self) -> int:
        return len(self._blocks) * self.block_tokens

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self._blocks.values())

    def lookup(self, prompt: Sequence[int]) -> list[Block]:
        """The cached blocks of the longest cached run from the prompt's start, leaving its last token uncovered;
        they become the most recently used. Counts the hit and the tokens left to compute."""
        found: list[Block] = []
        every = block_digests(prompt, self.block_tokens)
        self._looked_up = (prompt, every)
        digests = every[:(len(prompt) - 1) // self.block_tokens]  # the blocks before the last token
        for digest in digests:
            block = self._blocks.get(digest)
            if block is None:
                break
            found.append(block)
        self._touch(digests[:len(found)])
        self.hit_tokens += len(found) * self.block_tokens
        self.computed_tokens += len(prompt) - len(found) * self.block_tokens
        return found

    def store(self, prompt: Sequence[int], read: Callable[[int, int], Block]) -> None:
        """Keep the prompt's full blocks that are not cached yet; `read(start, end)` copies one out of the row's
        slot."""
        looked_up, every = self._looked_up
        digests = (every if looked_up is prompt else block_digests(prompt, self.block_tokens))[:self.max_blocks]
        for i, digest in enumerate(digests):
            if digest not in self._blocks:
                self._blocks[digest] = read(i * self.block_tokens, (i + 1) * self.block_tokens)
        self._touch(digests)
        while len(self._blocks) > self.max_blocks:
            self._blocks.popitem(last=False)

    def _touch(self, digests: list[bytes]) -> None:
        """Most recently used: these blocks, the first one most of all."""
        for digest in reversed(digests):
            self._blocks.move_to_end(digest)
