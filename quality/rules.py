"""The ``gopher-paper`` rule profile: Gopher quality and repetition, C4 and FineWeb as first written here (the
default profile, ``datatrove``, is rules_datatrove.py; rule_profiles.py picks one). Every rule of every family is
checked on the original text and every failure reported; quality/README.md lists how it differs from datatrove.

Each family is a frozen dataclass of thresholds (defaults from DeepMind Gopher / C4 / FineWeb as datatrove ships
them) with ``check(text) -> list[str]``: the reason codes of every failed rule, in a fixed order; empty = keep.
``build_filters`` makes them from names and threshold overrides and raises ValueError for anything unknown.

Shared definitions: *lines* are the non-empty stripped lines (``split_lines``); *words* are lowercased whitespace
tokens stripped of surrounding punctuation (``split_words``); stop words are counted as occurrences. Ratios over
zero lines or zero words are not evaluated (their rules pass), except where noted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from itertools import accumulate
from typing import ClassVar

import numpy as np

from prunefusion.quality.ngram_hash import repeat_scan_chars
from prunefusion.quality.sharma import STOP_WORDS, split_lines, split_words

_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n")
_CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]", re.IGNORECASE)
# a run of . ! ? (then closing quotes/brackets) before whitespace or the end. Matched from a run's first character
# only and without backtracking into it: as written before, `[.!?]+...` retried from every character of a run not so
# followed, 11 s on 16,000 dots (quadratic); the matches are the same (tested)
_SENTENCE_END = re.compile(r"(?<![.!?])[.!?]++[\"'\u201d\u2019)\]]*+(?=\s|$)")
BULLETS = ("\u2022", "-", "*", "\u2023", "\u25e6", "\u00b7")
ELLIPSES = ("...", "\u2026")
C4_TERMINAL = (".", "!", "?", '"', "\u201d")
C4_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
FINEWEB_TERMINAL = (".", "!", "?", '"', "\u201d", "\u2026")


def duplicates(items: list[str]) -> tuple[int, int]:
    """(items equal to an earlier item, their total characters)."""
    seen: set[str] = set()
    n = chars = 0
    for item in items:
        if item in seen:
            n += 1
            chars += len(item)
        else:
            seen.add(item)
    return n, chars


@dataclass(frozen=True)
class GopherQuality:
    """Gopher's quality rules (Rae et al. 2021, appendix A). Words are counted as ``split_words`` gives them."""

    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_symbol_word_ratio: float = 0.1  # for '#' and for ellipses ('...', '…') separately
    max_bullet_lines_ratio: float = 0.9
    max_ellipsis_lines_ratio: float = 0.3
    min_alpha_words_ratio: float = 0.8  # words with at least one alphabetic character
    min_stop_words: int = 2

    REASON_CODES: ClassVar[tuple[str, ...]] = (
        "gopher_too_few_words", "gopher_too_many_words", "gopher_mean_word_length", "gopher_symbol_ratio",
        "gopher_bullet_lines", "gopher_ellipsis_lines", "gopher_alpha_words", "gopher_stop_words",
    )

    def check(self, text: str) -> list[str]:
        words = split_words(text)
        n = len(words)
        lines = split_lines(text)
        failed = []
        if n < self.min_words:
            failed.append("gopher_too_few_words")
        if n > self.max_words:
            failed.append("gopher_too_many_words")
        if n:
            mean_length = sum(map(len, words)) / n
            if not self.min_mean_word_length <= mean_length <= self.max_mean_word_length:
                failed.append("gopher_mean_word_length")
            n_ellipses = sum(text.count(e) for e in ELLIPSES)
            if max(text.count("#"), n_ellipses) / n > self.max_symbol_word_ratio:
                failed.append("gopher_symbol_ratio")
        if lines:
            if sum(line.startswith(BULLETS) for line in lines) / len(lines) > self.max_bullet_lines_ratio:
                failed.append("gopher_bullet_lines")
            if sum(line.endswith(ELLIPSES) for line in lines) / len(lines) > self.max_ellipsis_lines_ratio:
                failed.append("gopher_ellipsis_lines")
        if n and sum(any(c.isalpha() for c in w) for w in words) / n < self.min_alpha_words_ratio:
            failed.append("gopher_alpha_words")
        if sum(map(STOP_WORDS.__contains__, words)) < self.min_stop_words:  # also fires on a document without words
            failed.append("gopher_stop_words")
        return failed


_TOP_NGRAMS = (2, 3, 4)
_DUP_NGRAMS = (5, 6, 7, 8, 9, 10)


@dataclass(frozen=True)
class GopherRepetition:
    """Gopher's repetition rules (Rae et al. 2021, table A1).

    Lines are ``split_lines``; paragraphs are the stripped blocks between blank lines. Line (paragraph) character
    fractions are over the characters of all lines (paragraphs). N-gram shares are over the characters of all words,
    an n-gram weighing the characters of its words (no spaces):
    - top n-gram (n = 2..4): characters of the most frequent n-gram times its count, only when it occurs at least
      twice (one occurrence is no repetition);
    - duplicated n-grams (n = 5..10): characters of the words inside n-grams seen before, scanning left to right and
      jumping past a repeat so that no word counts twice (datatrove's ``find_all_duplicate``).
    """

    max_dup_line_frac: float = 0.30
    max_dup_line_char_frac: float = 0.20
    max_dup_para_frac: float = 0.30
    max_dup_para_char_frac: float = 0.20
    max_top_2gram: float = 0.20
    max_top_3gram: float = 0.18
    max_top_4gram: float = 0.16
    max_dup_5gram: float = 0.15
    max_dup_6gram: float = 0.14
    max_dup_7gram: float = 0.13
    max_dup_8gram: float = 0.12
    max_dup_9gram: float = 0.11
    max_dup_10gram: float = 0.10

    REASON_CODES: ClassVar[tuple[str, ...]] = (
        "gopher_dup_line_frac", "gopher_dup_line_char_frac", "gopher_dup_para_frac", "gopher_dup_para_char_frac",
        *(f"gopher_top_{n}gram" for n in _TOP_NGRAMS), *(f"gopher_dup_{n}gram" for n in _DUP_NGRAMS),
    )

    def check(self, text: str) -> list[str]:
        failed = []
        for unit, items in (("line", split_lines(text)), ("para", self._paragraphs(text))):
            if not items:
                continue
            n_dup, dup_chars = duplicates(items)
            if n_dup / len(items) > getattr(self, f"max_dup_{unit}_frac"):
                failed.append(f"gopher_dup_{unit}_frac")
            if dup_chars / sum(map(len, items)) > getattr(self, f"max_dup_{unit}_char_frac"):
                failed.append(f"gopher_dup_{unit}_char_frac")
        words = split_words(text)
        total = sum(map(len, words))
        if not total:
            return failed
        # n-grams for n = 2..10 built incrementally from the (n-1)-grams: one np.unique per n
        for n, grams in ngram_series(words, max(_DUP_NGRAMS)):
            if not len(grams.counts) or grams.counts.max() < 2:
                break  # no n-gram repeats, so no longer one does either
            if n in _TOP_NGRAMS and self._top_ngram_chars(words, n, grams) / total > getattr(self, f"max_top_{n}gram"):
                failed.append(f"gopher_top_{n}gram")
            if n in _DUP_NGRAMS and self._dup_ngram_chars(words, n, grams) / total > getattr(self, f"max_dup_{n}gram"):
                failed.append(f"gopher_dup_{n}gram")
        return failed  # in REASON_CODES order: lines, paragraphs, top n-grams, duplicated n-grams

    @staticmethod
    def _paragraphs(text: str) -> list[str]:
        return [p for p in (p.strip() for p in _PARAGRAPH_BREAK.split(text)) if p]

    @staticmethod
    def _top_ngram_chars(words: list[str], n: int, grams: NGrams | None = None) -> int:
        grams = _ngrams(words, n) if grams is None else grams
        if not len(grams.keys):
            return 0
        count = int(grams.counts.max())
        if count < 2:
            return 0
        start = int(grams.first[grams.counts == count].min())  # ties: the n-gram seen first (Counter's order)
        return sum(map(len, words[start:start + n])) * count

    @staticmethod
    def _dup_ngram_chars(words: list[str], n: int, grams: NGrams | None = None) -> int:
        grams = _ngrams(words, n) if grams is None else grams
        if not len(grams.keys) or grams.counts.max() < 2:  # no n-gram repeats (most clean text)
            return 0
        ends = list(accumulate(map(len, words), initial=0))  # chars of words[a:b] = ends[b] - ends[a]
        return repeat_scan_chars(grams.keys.tolist(), grams.first[grams.keys], n, lambda j: ends[j + n] - ends[j])


@dataclass(frozen=True)
class NGrams:
    """The n-grams of a word list: keys[i] = a dense id of the n-gram at position i (equal ids <=> equal n-grams),
    first[k] = where id k first occurs, counts[k] = how often it occurs."""

    keys: np.ndarray
    first: np.ndarray
    counts: np.ndarray


def ngram_series(words: list[str], max_n: int):
    """Yield (n, NGrams) for n = 2..max_n. Exact: an n-gram is the pair (its (n-1)-gram's id, its last word's id),
    renumbered densely by one np.unique per n, so repeats are found by comparing ints, not tuples of strings."""
    ids = {w: i for i, w in enumerate(dict.fromkeys(words))}
    word_ids = np.fromiter(map(ids.__getitem__, words), dtype=np.int64, count=len(words))
    vocab = max(len(ids), 1)
    keys = word_ids
    for n in range(2, max_n + 1):
        if len(keys) < 2:
            empty = keys[:0]
            yield n, NGrams(empty, empty, empty)
            continue
        _, first, keys, counts = np.unique(keys[:-1] * vocab + word_ids[n - 1:], return_index=True,
                                           return_inverse=True, return_counts=True)
        yield n, NGrams(keys, first, counts)


def _ngrams(words: list[str], n: int) -> NGrams:
    return next(grams for m, grams in ngram_series(words, n) if m == n)


@dataclass(frozen=True)
class C4:
    """C4's rules (Raffel et al. 2020), as line filtering plus document rejection.

    A line is kept when, after removing citation marks ("[1]", "[edit]", "[citation needed]"), it ends with terminal
    punctuation (``C4_TERMINAL``, but not '...'), has at least ``min_words_per_line`` whitespace words, and mentions
    neither javascript nor a cookie/terms policy (``C4_POLICY``). The document is rejected for "lorem ipsum" or "{"
    anywhere in it (as the original C4), for no kept lines (``c4_no_lines_left``, which then stands in for
    ``c4_too_few_sentences``), or for fewer than ``min_sentences`` sentences in the kept lines. Sentences are counted
    simply: each run of . ! ? followed by whitespace or the end (closing quotes/brackets allowed between), at least
    one per kept line.
    """

    min_words_per_line: int = 3
    min_sentences: int = 3

    REASON_CODES: ClassVar[tuple[str, ...]] = (
        "c4_lorem_ipsum", "c4_curly_bracket", "c4_no_lines_left", "c4_too_few_sentences",
    )

    def kept_lines(self, text: str) -> list[str]:
        kept = []
        for raw in split_lines(text):
            line = _CITATION.sub("", raw).strip()
            lowered = line.lower()
            if (
                line.endswith(C4_TERMINAL)
                and not line.endswith("...")
                and len(line.split()) >= self.min_words_per_line
                and "javascript" not in lowered
                and not any(p in lowered for p in C4_POLICY)
            ):
                kept.append(line)
        return kept

    def clean(self, text: str) -> str:
        """The kept lines joined by newlines: C4 rewrites the documents it keeps."""
        return "\n".join(self.kept_lines(text))

    def check(self, text: str) -> list[str]:
        failed = []
        if "lorem ipsum" in text.lower():
            failed.append("c4_lorem_ipsum")
        if "{" in text:
            failed.append("c4_curly_bracket")
        kept = self.kept_lines(text)
        if not kept:
            failed.append("c4_no_lines_left")
        elif sum(max(1, len(_SENTENCE_END.findall(line))) for line in kept) < self.min_sentences:
            failed.append("c4_too_few_sentences")
        return failed


@dataclass(frozen=True)
class FineWeb:
    """FineWeb's extra rules (Penedo et al. 2024). A document without lines fails ``fineweb_line_punct_ratio``.

    Short lines are counted by stripped length; duplicate-line characters are over the characters of all lines;
    the list ratio is newline characters per word.
    """

    min_line_punct_ratio: float = 0.12  # fraction of lines ending in FINEWEB_TERMINAL must be > this
    max_short_line_ratio: float = 0.67  # fraction of lines of <= short_line_length chars must be < this
    short_line_length: int = 30
    max_char_dup_ratio: float = 0.01  # must be < this
    max_newline_word_ratio: float = 0.3  # must be <= this

    REASON_CODES: ClassVar[tuple[str, ...]] = (
        "fineweb_line_punct_ratio", "fineweb_short_line_ratio", "fineweb_char_dup_ratio", "fineweb_list_ratio",
    )

    def check(self, text: str) -> list[str]:
        lines = split_lines(text)
        if not lines:
            return ["fineweb_line_punct_ratio"]
        failed = []
        n = len(lines)
        if sum(line.endswith(FINEWEB_TERMINAL) for line in lines) / n <= self.min_line_punct_ratio:
            failed.append("fineweb_line_punct_ratio")
        if sum(len(line) <= self.short_line_length for line in lines) / n >= self.max_short_line_ratio:
            failed.append("fineweb_short_line_ratio")
        if duplicates(lines)[1] / sum(map(len, lines)) >= self.max_char_dup_ratio:
            failed.append("fineweb_char_dup_ratio")
        n_words = len(split_words(text))
        if n_words and text.count("\n") / n_words > self.max_newline_word_ratio:
            failed.append("fineweb_list_ratio")
        return failed


RuleFilter = GopherQuality | GopherRepetition | C4 | FineWeb
RULE_FILTERS: dict[str, type] = {
    "gopher_quality": GopherQuality,
    "gopher_repetition": GopherRepetition,
    "c4": C4,
    "fineweb": FineWeb,
}


def _coerce(filter_name: str, name: str, value: object, default: float) -> float:
    """A threshold override as the field's type; ValueError for a non-number, a negative, a fractional count, or a
    flag (a bool field) that is not 0 or 1."""
    if isinstance(default, bool):
        if value not in (0, 1) or isinstance(value, str):
            raise ValueError(f"flag {name!r} for {filter_name} must be 0 or 1 (or false/true), got {value!r}")
        return bool(value)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0 or value == float("inf"):
        raise ValueError(f"threshold {name!r} for {filter_name} must be a finite number >= 0, got {value!r}")
    if isinstance(default, int):
        if value != int(value):
            raise ValueError(f"threshold {name!r} for {filter_name} must be a whole number, got {value!r}")
        return int(value)
    return float(value)


def build_families(table: dict[str, type], names: list[str], thresholds: dict[str, dict[str, float]] | None = None,
                   kind: str = "rule filter") -> list:
    """Instances of the named classes of `table` in order, with threshold overrides (dataclass fields) by name.

    ValueError (for INVALID_ARGUMENT) names an unknown or repeated name, thresholds for a name not in ``names``,
    an unknown threshold, or an invalid value (the classes may refuse values in __post_init__).
    """
    thresholds = thresholds or {}
    for name in [*names, *thresholds]:
        if name not in table:
            raise ValueError(f"unknown {kind} {name!r}; known: {sorted(table)}")
    if len(set(names)) != len(names):
        raise ValueError(f"{kind}s named more than once: {names}")
    for name in thresholds:
        if name not in names:
            raise ValueError(f"thresholds given for {name!r}, which is not among the selected {kind}s {names}")
    built = []
    for name in names:
        cls = table[name]
        defaults = {f.name: f.default for f in fields(cls)}
        overrides = {}
        for key, value in thresholds.get(name, {}).items():
            if key not in defaults:
                raise ValueError(f"unknown threshold {key!r} for {name}; known: {sorted(defaults)}")
            overrides[key] = _coerce(name, key, value, defaults[key])
        built.append(cls(**overrides))
    return built


def threshold_defaults(table: dict[str, type]) -> dict[str, float]:
    """"name.threshold" -> default value for every class of `table` (flags as 0/1), as requests name them."""
    return {f"{name}.{f.name}": float(f.default) for name, cls in table.items() for f in fields(cls)}


def build_filters(names: list[str], thresholds: dict[str, dict[str, float]] | None = None) -> list[RuleFilter]:
    """The named rule filter families in order, with threshold overrides by family name (see build_families)."""
    return build_families(RULE_FILTERS, names, thresholds)
