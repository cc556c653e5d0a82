"""The Sharma et al. 2024 text quality score (arXiv 2405.01582), pure Python.

Each non-empty line is checked by binary filters ``I_i`` (True = passes). Filter ``i`` has a weight ``w_i`` learnt
from a reference LM, ``w_i = max(0, (PPL_all - PPL_i) / PPL_all)`` (``weight_from_perplexity``). Then

    line score     = sum_i w_i * I_i(line) / sum_i w_i                      (in [0, 1])
    document score = sum_l tokens(l) * score(l) / sum_l tokens(l)           (token-count-weighted mean)

Only the ten filters that need no parser are implemented. The paper's four parser-based filters (has object,
has noun, has determiner, text complexity) are left out: they need a dependency parser with its model, and none
installs here.

Definitions (where the paper leaves room):
- A *token* is a whitespace-separated piece (``str.split()``).
- A *word* is a token, lowercased, with leading/trailing punctuation stripped (``PUNCTUATION``); tokens that
  strip to nothing (``"--"``, ``"..."``) are not words. ``split_words`` gives them.
- Word repetition ratio = (words - distinct words) / words: the share of words that repeat an earlier word of
  the same line. A line with no words has ratio 0.
- Digit/punctuation ratio = (ASCII digits + ``PUNCTUATION`` characters) / words. A line with no words passes only
  when it has no such characters.
- Stop words are counted as occurrences (``"the cat and the dog"`` has 3), as datatrove does.
- ``not_all_caps`` is ``not str.isupper()``: a line without cased letters (``"2024"``) passes.
"""

from __future__ import annotations

import json
import math
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import compress
from pathlib import Path
from typing import Any

MAX_WORD_REPETITION_RATIO = 0.2
MAX_DIGIT_PUNCT_RATIO = 0.25
MIN_STOP_WORDS = 2
MIN_TOKENS_EXCLUSIVE = 3  # more_than_3_tokens: tokens > 3
MIN_WORDS = 3
MAX_WORDS = 256
STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
TERMINAL_PUNCTUATION = (".", "!", "?", '"')
BANNED_SUBSTRINGS = ("javascript", "lorem ipsum")  # matched lowercased
# ASCII punctuation plus the common typographic marks of web text.
PUNCTUATION = string.punctuation + "\u201c\u201d\u2018\u2019\u00ab\u00bb\u2013\u2014\u2026\u00bf\u00a1\u00b7\u2022"

# Deleting digits and punctuation and comparing lengths counts them in C; bytes.translate is ~10x faster than
# str.translate, so ASCII lines (most of them) take that path.
_DELETE_DIGIT_PUNCT = dict.fromkeys(map(ord, string.digits + PUNCTUATION))
_DELETE_DIGIT_PUNCT_ASCII = (string.digits + string.punctuation).encode("ascii")
_WEIGHTS_FORMAT = "prunefusion.quality.sharma.weights"
DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "default_weights.json"  # the shipped calibration


def split_words(line: str) -> list[str]:
    """The line's words: lowercased whitespace tokens stripped of surrounding punctuation, empties dropped."""
    return [w for t in line.lower().split() if (w := t.strip(PUNCTUATION))]


# -- the pieces each filter is made of; line_signals reuses them with shared intermediates --------------------------


def _repetition_ok(words: list[str]) -> bool:
    n = len(words)
    return n - len(set(words)) <= MAX_WORD_REPETITION_RATIO * n


def _digit_punct_ok(line: str, n_words: int) -> bool:
    if line.isascii():
        n_chars = len(line) - len(line.encode("ascii").translate(None, _DELETE_DIGIT_PUNCT_ASCII))
    else:
        n_chars = len(line) - len(line.translate(_DELETE_DIGIT_PUNCT))
    return n_chars <= MAX_DIGIT_PUNCT_RATIO * n_words


def _stop_words_ok(words: list[str]) -> bool:
    return sum(map(STOP_WORDS.__contains__, words)) >= MIN_STOP_WORDS


def _banned_ok(lowered: str) -> bool:
    return not any(s in lowered for s in BANNED_SUBSTRINGS)


def _word_count_ok(n_words: int) -> bool:
    return MIN_WORDS <= n_words <= MAX_WORDS


# -- the ten line filters (line -> passes) ---------------------------------------------------------------------------


def first_char_upper(line: str) -> bool:
    """The first non-space character is an uppercase letter."""
    return line.lstrip()[:1].isupper()


def not_all_caps(line: str) -> bool:
    """Not every cased character is uppercase (lines without letters pass)."""
    return not line.isupper()


def word_repetition_ratio(line: str) -> bool:
    """Share of words repeating an earlier word of the line <= MAX_WORD_REPETITION_RATIO."""
    return _repetition_ok(split_words(line))


def digit_punct_ratio(line: str) -> bool:
    """(digits + punctuation characters) / words <= MAX_DIGIT_PUNCT_RATIO."""
    return _digit_punct_ok(line, len(split_words(line)))


def no_curly_bracket(line: str) -> bool:
    """No '{' (code, templates)."""
    return "{" not in line


def terminal_punctuation(line: str) -> bool:
    """Ends with . ! ? or a straight double quote."""
    return line.rstrip().endswith(TERMINAL_PUNCTUATION)


def stop_words(line: str) -> bool:
    """At least MIN_STOP_WORDS occurrences of STOP_WORDS (whole words, case-insensitive)."""
    return _stop_words_ok(split_words(line))


def no_javascript_lorem(line: str) -> bool:
    """Neither 'javascript' nor 'lorem ipsum', case-insensitive."""
    return _banned_ok(line.lower())


def more_than_3_tokens(line: str) -> bool:
    """More than MIN_TOKENS_EXCLUSIVE whitespace tokens."""
    return len(line.split()) > MIN_TOKENS_EXCLUSIVE


def words_3_to_256(line: str) -> bool:
    """MIN_WORDS..MAX_WORDS words (inclusive)."""
    return _word_count_ok(len(split_words(line)))


LINE_FILTERS: dict[str, Callable[[str], bool]] = {
    "first_char_upper": first_char_upper,
    "not_all_caps": not_all_caps,
    "word_repetition_ratio": word_repetition_ratio,
    "digit_punct_ratio": digit_punct_ratio,
    "no_curly_bracket": no_curly_bracket,
    "terminal_punctuation": terminal_punctuation,
    "stop_words": stop_words,
    "no_javascript_lorem": no_javascript_lorem,
    "more_than_3_tokens": more_than_3_tokens,
    "words_3_to_256": words_3_to_256,
}
FILTER_NAMES: tuple[str, ...] = tuple(LINE_FILTERS)


def _evaluate(line: str) -> tuple[tuple[bool, ...], int]:
    """All filters of LINE_FILTERS in FILTER_NAMES order, sharing the split, plus the whitespace token count.

    Must agree with calling each LINE_FILTERS function (tests check it on many lines); it exists for speed.
    """
    lowered = line.lower()
    tokens = lowered.split()
    words = [w for t in tokens if (w := t.strip(PUNCTUATION))]
    n_words = len(words)
    n_tokens = len(tokens)
    signals = (
        line.lstrip()[:1].isupper(),
        not line.isupper(),
        _repetition_ok(words),
        _digit_punct_ok(line, n_words),
        "{" not in line,
        line.rstrip().endswith(TERMINAL_PUNCTUATION),
        _stop_words_ok(words),
        _banned_ok(lowered),
        n_tokens > MIN_TOKENS_EXCLUSIVE,
        _word_count_ok(n_words),
    )
    return signals, n_tokens


def line_signals(line: str) -> dict[str, bool]:
    """Every filter's verdict on one line, by filter name."""
    return dict(zip(FILTER_NAMES, _evaluate(line)[0], strict=True))


# -- weights ---------------------------------------------------------------------------------------------------------


def weight_from_perplexity(ppl_all: float, ppl_filtered: float) -> float:
    """w_i = max(0, (PPL_all - PPL_i) / PPL_all): how much keeping only the lines passing filter i lowers perplexity."""
    if not (math.isfinite(ppl_all) and ppl_all > 0):
        raise ValueError(f"ppl_all must be a finite positive number, got {ppl_all!r}")
    if not (math.isfinite(ppl_filtered) and ppl_filtered > 0):
        raise ValueError(f"ppl_filtered must be a finite positive number, got {ppl_filtered!r}")
    return max(0.0, (ppl_all - ppl_filtered) / ppl_all)


@dataclass(frozen=True)
class Weights:
    """Filter weights by filter name, and where they came from (reference LM, corpus, perplexities: free-form JSON).

    Names missing from ``values`` weigh 0. Construction raises ValueError for an unknown filter name, a negative or
    non-finite weight, or all weights 0 (a line score would be 0/0).
    """

    values: dict[str, float]
    provenance: dict[str, Any] = field(default_factory=dict)
    _vector: tuple[float, ...] = field(init=False, repr=False, compare=False)
    _total: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.values) - set(FILTER_NAMES))
        if unknown:
            raise ValueError(f"unknown filter name {unknown[0]!r} in weights; known: {list(FILTER_NAMES)}")
        values = {name: float(w) for name, w in self.values.items()}
        for name, w in values.items():
            if not math.isfinite(w) or w < 0:
                raise ValueError(f"weight for {name!r} must be a finite number >= 0, got {w!r}")
        vector = tuple(values.get(name, 0.0) for name in FILTER_NAMES)
        if sum(vector) <= 0:
            raise ValueError("all filter weights are 0: at least one must be positive")
        object.__setattr__(self, "values", values)
        object.__setattr__(self, "provenance", dict(self.provenance))
        object.__setattr__(self, "_vector", vector)
        object.__setattr__(self, "_total", sum(vector))

    @classmethod
    def uniform(cls) -> Weights:
        """Weight 1 for every filter: the line score is the fraction of filters passed."""
        return cls(dict.fromkeys(FILTER_NAMES, 1.0), {"source": "uniform"})

    def save(self, path: str | Path) -> None:
        """Write JSON (provenance must be JSON-serialisable)."""
        doc = {"format": _WEIGHTS_FORMAT, "version": 1, "values": self.values, "provenance": self.provenance}
        Path(path).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Weights:
        """Read what ``save`` wrote; ValueError for another format or invalid weights."""
        doc = json.loads(Path(path).read_text())
        if not isinstance(doc, dict) or doc.get("format") != _WEIGHTS_FORMAT or not isinstance(doc.get("values"), dict):
            raise ValueError(f"{path}: not a Sharma weights file (format {_WEIGHTS_FORMAT!r} with 'values')")
        return cls(doc["values"], doc.get("provenance") or {})


def line_score(line: str, weights: Weights) -> float:
    """sum_i w_i I_i(line) / sum_i w_i, in [0, 1]."""
    return _weighted(_evaluate(line)[0], weights)


def _weighted(passed, weights: Weights) -> float:
    """The line score of filter outcomes (one bool per filter, in FILTER_NAMES order)."""
    return sum(compress(weights._vector, passed)) / weights._total


# -- documents -------------------------------------------------------------------------------------------------------


def _line_spans(text: str) -> list[tuple[int, int]]:
    """[start, end) offsets of each non-empty stripped line (str.splitlines line breaks)."""
    spans = []
    start = 0
    for raw in text.splitlines(keepends=True):
        stripped = raw.strip()
        if stripped:
            lead = len(raw) - len(raw.lstrip())
            spans.append((start + lead, start + lead + len(stripped)))
        start += len(raw)
    return spans


def split_lines(text: str) -> list[str]:
    """Non-empty lines, stripped."""
    return [text[s:e] for s, e in _line_spans(text)]


@dataclass(frozen=True)
class DocumentScore:
    """A document's score with its per-line parts.

    ``line_spans[i]`` is the [start, end) character range of line ``i`` in the original text; ``signals`` is each
    filter's pass rate over lines (0.0 for every filter when there are no lines); ``token_count`` sums
    ``line_token_counts``.
    """

    score: float
    line_scores: tuple[float, ...]
    line_spans: tuple[tuple[int, int], ...]
    line_token_counts: tuple[int, ...]
    signals: dict[str, float]
    token_count: int


def document_score(text: str, weights: Weights, tokenize: Callable[[str], int] | None = None) -> DocumentScore:
    """Token-count-weighted mean of the line scores.

    ``tokenize(line) -> int`` counts a line's tokens (default: whitespace tokens). A document without lines, or whose
    lines count 0 tokens in all, scores 0.0.
    """
    spans = _line_spans(text)
    if not spans:
        return DocumentScore(0.0, (), (), (), dict.fromkeys(FILTER_NAMES, 0.0), 0)
    rows = []
    scores = []
    counts = []
    for s, e in spans:
        line = text[s:e]
        signals, n_tokens = _evaluate(line)
        rows.append(signals)
        scores.append(_weighted(signals, weights))
        counts.append(n_tokens if tokenize is None else tokenize(line))
    if tokenize is not None and any(c < 0 for c in counts):
        raise ValueError("tokenize returned a negative token count")
    token_count = sum(counts)
    score = sum(map(float.__mul__, scores, map(float, counts))) / token_count if token_count else 0.0
    n = len(rows)
    pass_rates = {name: sum(col) / n for name, col in zip(FILTER_NAMES, zip(*rows, strict=True), strict=True)}
    return DocumentScore(score, tuple(scores), tuple(spans), tuple(counts), pass_rates, token_count)


def load_weights(path: str | Path | None = None) -> Weights:
    """Weights from a file; None: the shipped calibration (uniform weights if that file is missing)."""
    if path is not None:
        return Weights.load(path)
    return Weights.load(DEFAULT_WEIGHTS) if DEFAULT_WEIGHTS.is_file() else Weights.uniform()
