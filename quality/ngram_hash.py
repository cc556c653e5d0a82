"""datatrove's Gopher repetition n-gram measures, exact and fast.

datatrove keys its top 2..4-grams by ``" ".join(words)``: for words without whitespace that is the word tuple, so
``top_chars`` counts tuples. It keys its duplicated 5..10-grams by ``"".join(words)`` (("ab", "c") and ("a", "bc")
are one n-gram there), which ``HashedNGrams`` follows without building a string per n-gram: the words are joined
once, every n-gram is a substring, its key a polynomial hash of that substring (numpy, uint64 arithmetic that
wraps), the top 4 bits the n, all n in one ``np.unique``. Every group of equal keys that occurs more than once is
then checked by comparing the substrings' characters; a hash collision (never seen outside the tests, which force
one) makes the measure fall back to datatrove's own loop (``*_reference``). So the results equal datatrove's by
construction, not by probability.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np

BASE = np.uint64(0x9E3779B97F4A7C15)  # odd, so invertible modulo 2**64
BASE_INVERSE = np.uint64(pow(int(BASE), -1, 2**64))
_LENGTH_MIX = np.uint64(0xBF58476D1CE4E5B9)


class HashedNGrams:
    """The n-grams of one word list, joined by `joiner`; each group of n in `groups` is hashed (one ``np.unique``)
    the first time one of its n is asked for, so a rule that fails early skips the rest."""

    def __init__(self, words: Sequence[str], joiner: str, groups: tuple[tuple[int, ...], ...]) -> None:
        self.words = words
        self.stream = joiner.join(words)
        lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
        self.starts = np.concatenate([[0], np.cumsum(lengths + len(joiner))])[:-1]  # word i's first character
        self.stops = self.starts + lengths  # one past word i's last character
        self.codes = np.frombuffer(self.stream.encode("utf-32-le"), dtype=np.uint32)
        self._group_of = {n: group for group in groups for n in group}
        self._prefix: np.ndarray | None = None
        self._local: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def has(self, n: int) -> bool:
        return len(self.words) >= n

    def _text(self, n: int, i: int) -> str:
        return self.stream[self.starts[i]:self.stops[i + n - 1]]

    def _substring_hashes(self, n: int) -> np.ndarray:
        if self._prefix is None:
            powers, self._inverse_powers = _powers(len(self.codes))
            with np.errstate(over="ignore"):
                self._prefix = np.concatenate([[np.uint64(0)], np.cumsum(self.codes * powers, dtype=np.uint64)])
        a, b = self.starts[:len(self.words) - n + 1], self.stops[n - 1:]
        with np.errstate(over="ignore"):
            h = (self._prefix[b] - self._prefix[a]) * self._inverse_powers[a] ^ (b - a).astype(np.uint64) * _LENGTH_MIX
        return (h >> np.uint64(4)) | np.uint64(n << 60)  # the top 4 bits are n: no two n share a key

    def _groups(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(group id, the group's first position, the group's size) for each position of the n-grams."""
        if n not in self._local:
            ns = [m for m in self._group_of.get(n, (n,)) if self.has(m)]
            keys = [self._substring_hashes(m) for m in ns]
            _, first, ids, counts = np.unique(np.concatenate(keys), return_index=True, return_inverse=True,
                                              return_counts=True)
            start = 0
            for m, k in zip(ns, keys, strict=True):
                local = ids[start:start + len(k)]
                self._local[m] = (local, first[local] - start, counts[local])
                start += len(k)
        return self._local[n]


    def _collides(self, n: int) -> bool:
        """Whether some n-gram's key group holds a different string than its first member: every later member's
        characters against the first's, all at once."""
        _, first, counts = self._groups(n)
        later = np.nonzero((counts > 1) & (first != np.arange(len(first))))[0]
        if not len(later):
            return False
        a, lengths = self.starts[later], self.stops[later + n - 1] - self.starts[later]
        head = self.starts[first[later]]
        if np.any(self.stops[first[later] + n - 1] - head != lengths):
            return True
        offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        theirs, ours = np.repeat(head, lengths) + offsets, np.repeat(a, lengths) + offsets
        return bool(np.any(self.codes[ours] != self.codes[theirs]))

    def duplicate_chars(self, n: int) -> int:
        """datatrove's ``find_all_duplicate(words, n)``: scanning left to right, the characters of every n-gram
        seen before, jumping past it so that no word counts twice."""
        if not self.has(n):
            return 0
        ids, first, counts = self._groups(n)
        if counts.max() < 2:
            return 0
        if self._collides(n):
            return duplicate_chars_reference(self.words, n)
        return repeat_scan_chars(ids.tolist(), first, n, lambda j: len(self._text(n, j)))


_POWERS: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # BASE -> (BASE**1.., BASE**-0..), grown by doubling


def _powers(length: int) -> tuple[np.ndarray, np.ndarray]:
    """BASE**(i + 1) for i < length, and BASE**-i for i <= length (uint64, wrapping)."""
    cached = _POWERS.get(int(BASE))
    if cached is None or len(cached[0]) < length:
        size = max(length, 2 * len(cached[0]) if cached else 1024)
        with np.errstate(over="ignore"):
            cached = (np.cumprod(np.full(size, BASE, dtype=np.uint64)),
                      np.concatenate([[np.uint64(1)], np.cumprod(np.full(size, BASE_INVERSE, dtype=np.uint64))]))
        _POWERS[int(BASE)] = cached
    return cached[0][:length], cached[1][:length + 1]


def repeat_scan_chars(ids: list[int], first: np.ndarray, n: int, chars_at: Callable[[int], int]) -> int:
    """datatrove's ``find_all_duplicate`` scan over n-gram ids (equal ids = equal n-grams; ``first[i]``: where the
    n-gram at position i first occurs): left to right, a position whose n-gram was seen before adds its
    characters (``chars_at``) and jumps past it, so that no word counts twice. Only the positions whose n-gram
    occurred earlier can be repeats; every other visited position is new, so the scan visits those alone."""
    candidates = np.nonzero(first < np.arange(len(ids)))[0].tolist()
    seen: set[int] = set()
    chars = i = 0
    for j in candidates:
        if j < i:  # inside a repeat already counted
            continue
        seen.update(ids[i:j])
        if ids[j] in seen:
            chars += chars_at(j)
            i = j + n
        else:
            seen.add(ids[j])
            i = j + 1
    return chars


def top_chars(words: Sequence[str], n: int) -> int:
    """datatrove's ``find_top_duplicate(get_n_grams(words, n))``: len(" ".join(most frequent n-gram)) * its count,
    the one seen first on ties (both Counters keep first-seen order); 0 without n-grams. Counted as word tuples,
    which is the same for words without whitespace (spaCy's never have any): one C-level Counter pass, no strings."""
    if len(words) < n:
        return 0
    gram, count = Counter(zip(*(words[k:] for k in range(n)), strict=False)).most_common(1)[0]  # shifted copies
    return (sum(map(len, gram)) + n - 1) * count


def top_chars_reference(words: Sequence[str], n: int) -> int:
    """datatrove's top n-gram loop in effect: the fallback, and what the tests hold the fast path to."""
    grams = [" ".join(words[i:i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0
    gram, count = Counter(grams).most_common(1)[0]
    return len(gram) * count


def duplicate_chars_reference(words: Sequence[str], n: int) -> int:
    """datatrove's ``find_all_duplicate`` loop in effect."""
    unique: set[str] = set()
    chars = i = 0
    while i < len(words) - n + 1:
        gram = "".join(words[i:i + n])
        if gram in unique:
            chars += len(gram)
            i += n
        else:
            unique.add(gram)
            i += 1
    return chars
