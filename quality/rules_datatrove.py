"""The ``datatrove`` rule profile: Gopher quality and repetition, C4 and FineWeb deciding as datatrove 0.10.1 does.

Each class follows one datatrove filter line by line: the same words (spaCy's blank ``en`` tokens, spacy_text.py),
the same rules in the same order, stopping at the first failed rule with its reason, and C4's rewriting of the
documents it keeps (``apply`` returns the text the next family sees, as a datatrove pipeline passes its Document
on). Thresholds are named as datatrove's constructor arguments; as there, a zero line/paragraph fraction or a false
flag turns its rule off. The fast parts are exact reformulations, tested against datatrove itself:
- spaCy's words a whitespace chunk at a time, and its sentencizer's rule on them (spacy_text.py);
- top n-grams as word tuples, duplicated ones as hashed substrings, each hash group checked (ngram_hash.py);
- C4 counts sentences only when the kept lines alone (each at least one sentence) do not reach the minimum.
Zero-word corner cases, where datatrove divides by zero, pass here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from prunefusion.quality import spacy_text
from prunefusion.quality.ngram_hash import HashedNGrams, top_chars
from prunefusion.quality.rules import C4_POLICY, duplicates  # the same policy phrases as datatrove's
from prunefusion.quality.sharma import STOP_WORDS  # datatrove's eight, matched case-sensitively here

# datatrove.utils.text.PUNCTUATION and TERMINAL_PUNCTUATION (its ``PUNCTUATION_SET`` is their union)
PUNCTUATION = ('!/—”:％１〈&(、━\\【#%「」，】；+^]~“《„\';’{|∶´[=-`*．（–？！：$～«〉,><》)?）。…@_."}►»'
               + "".join(map(chr, (*range(0, 9), *range(11, 32), *range(127, 160)))))
TERMINAL_PUNCTUATION = frozenset(
    "!.?\u0589\u061d\u061e\u061f\u06d4\u0700\u0701\u0702\u07f9\u0837\u0839\u083d\u083e\u0964\u0965\u104a"
    "\u104b\u1362\u1367\u1368\u166e\u1735\u1736\u17d4\u17d5\u17d6\u17d9\u17da\u1803\u1809\u1944\u1945\u1aa8"
    "\u1aa9\u1aaa\u1aab\u1b5a\u1b5b\u1b5e\u1b5f\u1b7d\u1b7e\u1c3b\u1c3c\u1c7e\u1c7f\u203c\u203d\u2047\u2048"
    "\u2049\u2e2e\u2e3c\u2e53\u2e54\u3002\ua4ff\ua60e\ua60f\ua6f3\ua6f7\ua876\ua877\ua8ce\ua8cf\ua92f\ua9c8"
    "\ua9c9\uaa5d\uaa5e\uaa5f\uaaf0\uaaf1\uabeb\ufe52\ufe56\ufe57\uff01\uff0e\uff1f\uff61\U00010a56\U00010a57"
    "\U00010f55\U00010f56\U00010f57\U00010f58\U00010f59\U00010f86\U00010f87\U00010f88\U00010f89\U00011047"
    "\U00011048\U000110be\U000110bf\U000110c0\U000110c1\U00011141\U00011142\U00011143\U000111c5\U000111c6"
    "\U000111cd\U000111de\U000111df\U00011238\U00011239\U0001123b\U0001123c\U000112a9\U0001144b\U0001144c"
    "\U000115c2\U000115c3\U000115c9\U000115ca\U000115cb\U000115cc\U000115cd\U000115ce\U000115cf\U000115d0"
    "\U000115d1\U000115d2\U000115d3\U000115d4\U000115d5\U000115d6\U000115d7\U00011641\U00011642\U0001173c"
    "\U0001173d\U0001173e\U00011944\U00011946\U00011a42\U00011a43\U00011a9b\U00011a9c\U00011c41\U00011c42"
    "\U00011ef7\U00011ef8\U00011f43\U00011f44\U00016a6e\U00016a6f\U00016af5\U00016b37\U00016b38\U00016b44"
    "\U00016e98\U0001bc9f\U0001da88"
)
PUNCTUATION_SET = frozenset(PUNCTUATION) | TERMINAL_PUNCTUATION
CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
C4_END_PUNCTUATION = (".", "?", "!", '"', "'")
_PARAGRAPHS, _LINES = re.compile(r"\n{2,}"), re.compile("\n+")
_TOP_NGRAMS, _DUP_NGRAMS = (2, 3, 4), (5, 6, 7, 8, 9, 10)


class _FirstFailure:
    """A family whose ``_first_failure(text)`` names datatrove's reason (or None) and which keeps the text as is."""

    def check(self, text: str) -> list[str]:
        reason = self._first_failure(text)
        return [reason] if reason else []

    def apply(self, text: str) -> tuple[list[str], str]:
        return self.check(text), text


@dataclass(frozen=True)
class GopherQuality(_FirstFailure):
    """datatrove's ``GopherQualityFilter``: word counts and lengths over words with a non-punctuation character,
    symbol and alpha ratios over all words, bullets and ellipses over all ``splitlines()`` lines, distinct
    case-sensitive stop words."""

    min_doc_words: int = 50
    max_doc_words: int = 100_000
    min_avg_word_length: float = 3.0
    max_avg_word_length: float = 10.0
    max_symbol_word_ratio: float = 0.1
    max_bullet_lines_ratio: float = 0.9
    max_ellipsis_lines_ratio: float = 0.3
    max_non_alpha_words_ratio: float = 0.8  # datatrove's name; the share of words with a letter must reach it
    min_stop_words: int = 2

    DATATROVE_FILTER: ClassVar[str] = "GopherQualityFilter"  # in datatrove.pipeline.filters
    REASON_PREFIX: ClassVar[str] = ""  # our reason code = this + datatrove's reason name
    REASON_CODES: ClassVar[tuple[str, ...]] = (
        "gopher_short_doc", "gopher_long_doc", "gopher_below_avg_threshold", "gopher_above_avg_threshold",
        "gopher_too_many_hashes", "gopher_too_many_ellipsis", "gopher_too_many_bullets",
        "gopher_too_many_end_ellipsis", "gopher_below_alpha_threshold", "gopher_enough_stop_words",
    )

    def _first_failure(self, text: str) -> str | None:
        words = spacy_text.words(text)
        n_words = len(words)
        lengths = [len(w) for w in words if not PUNCTUATION_SET.issuperset(w)]
        if self.min_doc_words and len(lengths) < self.min_doc_words:
            return "gopher_short_doc"
        if self.max_doc_words and len(lengths) > self.max_doc_words:
            return "gopher_long_doc"
        mean = sum(lengths) / len(lengths) if lengths else float("nan")  # nan compares false, as np.mean([])
        if self.min_avg_word_length and mean < self.min_avg_word_length:
            return "gopher_below_avg_threshold"
        if self.max_avg_word_length and mean > self.max_avg_word_length:
            return "gopher_above_avg_threshold"
        if n_words and self.max_symbol_word_ratio:
            if text.count("#") / n_words > self.max_symbol_word_ratio:
                return "gopher_too_many_hashes"
            if (text.count("...") + text.count("…")) / n_words > self.max_symbol_word_ratio:
                return "gopher_too_many_ellipsis"
        lines = text.splitlines()
        if lines and self.max_bullet_lines_ratio:
            bullets = sum(s.lstrip().startswith(("•", "-")) for s in lines)
            if bullets / len(lines) > self.max_bullet_lines_ratio:
                return "gopher_too_many_bullets"
        if lines and self.max_ellipsis_lines_ratio:
            ellipses = sum(s.rstrip().endswith(("...", "…")) for s in lines)
            if ellipses / len(lines) > self.max_ellipsis_lines_ratio:
                return "gopher_too_many_end_ellipsis"
        if n_words and self.max_non_alpha_words_ratio:
            alpha = sum(any(map(str.isalpha, w)) for w in words)
            if alpha / n_words < self.max_non_alpha_words_ratio:
                return "gopher_below_alpha_threshold"
        if self.min_stop_words and len(STOP_WORDS.intersection(words)) < self.min_stop_words:
            return "gopher_enough_stop_words"
        return None


@dataclass(frozen=True)
class GopherRepetition(_FirstFailure):
    """datatrove's ``GopherRepetitionFilter``: every fraction is over ``len(text)``; paragraphs split on 2+
    newlines of the stripped text, lines on 1+ newlines; the top 2..4-gram weighs its words joined by spaces times
    its count (one occurrence included); duplicated 5..10-grams are datatrove's ``find_all_duplicate``."""

    dup_line_frac: float = 0.3
    dup_para_frac: float = 0.3
    dup_line_char_frac: float = 0.2
    dup_para_char_frac: float = 0.2
    top_2_gram: float = 0.20
    top_3_gram: float = 0.18
    top_4_gram: float = 0.16
    duplicated_5_n_grams: float = 0.15
    duplicated_6_n_grams: float = 0.14
    duplicated_7_n_grams: float = 0.13
    duplicated_8_n_grams: float = 0.12
    duplicated_9_n_grams: float = 0.11
    duplicated_10_n_grams: float = 0.10

    DATATROVE_FILTER: ClassVar[str] = "GopherRepetitionFilter"  # in datatrove.pipeline.filters
    REASON_PREFIX: ClassVar[str] = "gopher_"  # our reason code = this + datatrove's reason name
    REASON_CODES: ClassVar[tuple[str, ...]] = (
        "gopher_empty", "gopher_dup_para_frac", "gopher_dup_para_char_frac", "gopher_dup_line_frac",
        "gopher_dup_line_char_frac", *(f"gopher_top_{n}_gram" for n in _TOP_NGRAMS),
        *(f"gopher_duplicated_{n}_n_grams" for n in _DUP_NGRAMS),
    )

    def _first_failure(self, text: str) -> str | None:
        if not text:
            return "gopher_empty"
        size = len(text)
        for unit, items in (("para", _PARAGRAPHS.split(text.strip())), ("line", _LINES.split(text))):
            n_dup, dup_chars = duplicates(items)
            frac, char_frac = getattr(self, f"dup_{unit}_frac"), getattr(self, f"dup_{unit}_char_frac")
            if frac and n_dup / len(items) > frac:
                return f"gopher_dup_{unit}_frac"
            if char_frac and dup_chars / size > char_frac:
                return f"gopher_dup_{unit}_char_frac"
        words = spacy_text.words(text)
        for n in _TOP_NGRAMS:
            if len(words) >= n and top_chars(words, n) / size > getattr(self, f"top_{n}_gram"):
                return f"gopher_top_{n}_gram"
        # 5-grams hashed alone first: a document that repeats itself stops there, before the longer n-grams
        duplicated = HashedNGrams(words, "", groups=(_DUP_NGRAMS[:1], _DUP_NGRAMS[1:]))
        for n in _DUP_NGRAMS:
            if duplicated.duplicate_chars(n) / size > getattr(self, f"duplicated_{n}_n_grams"):
                return f"gopher_duplicated_{n}_n_grams"
        return None


@dataclass(frozen=True)
class C4:
    """datatrove's ``C4QualityFilter`` with ``split_paragraph=True`` (C4's lines): each stripped line is dropped
    for a word over ``max_word_length`` characters, then (citations removed) for no terminal punctuation or an
    ellipsis end, fewer than ``min_words_per_line`` words, javascript, or a policy phrase; "lorem ipsum" or "{" in
    a line that got that far rejects the document. Kept: fewer than ``min_num_sentences`` spaCy sentences in the
    kept lines rejects it; otherwise its text becomes the kept lines."""

    remove_citations: bool = True
    filter_no_terminal_punct: bool = True
    min_num_sentences: int = 5
    min_words_per_line: int = 3
    max_word_length: int = 1000
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = True
    filter_curly_bracket: bool = True
    filter_policy: bool = True

    DATATROVE_FILTER: ClassVar[str] = "C4QualityFilter"  # in datatrove.pipeline.filters
    REASON_PREFIX: ClassVar[str] = "c4_"  # our reason code = this + datatrove's reason name
    REASON_CODES: ClassVar[tuple[str, ...]] = ("c4_lorem_ipsum", "c4_curly_bracket", "c4_too_few_sentences")

    def apply(self, text: str) -> tuple[list[str], str]:
        kept = []
        for line in text.splitlines():
            line = line.strip()
            words = line.split()
            if any(len(word) > self.max_word_length for word in words):
                continue
            if self.remove_citations:
                line = CITATION.sub("", line)
            if self.filter_no_terminal_punct and (not line.endswith(C4_END_PUNCTUATION) or line.endswith("...")):
                continue
            if len(words) < self.min_words_per_line:
                continue
            lowered = line.lower()
            if self.filter_lorem_ipsum and "lorem ipsum" in lowered:
                return ["c4_lorem_ipsum"], text
            if self.filter_javascript and "javascript" in lowered:
                continue
            if self.filter_curly_bracket and "{" in line:
                return ["c4_curly_bracket"], text
            if self.filter_policy and any(p in lowered for p in C4_POLICY):
                continue
            kept.append(line)
        if not self._enough_sentences(kept):
            return ["c4_too_few_sentences"], text
        return [], "\n".join(kept).strip()

    def _enough_sentences(self, kept: list[str]) -> bool:
        if len(kept) >= self.min_num_sentences:  # every kept line is at least one sentence
            return True
        total = 0
        for line in kept:
            total += spacy_text.sentence_count(line)
            if total >= self.min_num_sentences:
                return True
        return total >= self.min_num_sentences

    def check(self, text: str) -> list[str]:
        return self.apply(text)[0]

    def clean(self, text: str) -> str:
        """The text a kept document continues with (the document itself when rejected)."""
        return self.apply(text)[1]


@dataclass(frozen=True)
class FineWeb(_FirstFailure):
    """datatrove's ``FineWebQualityFilter``: lines are the non-blank ``split("\\n")`` pieces, unstripped; the
    terminal set is datatrove's ``TERMINAL_PUNCTUATION``; duplicate-line characters are over the text without
    newlines; the list ratio is newlines per spaCy word."""

    line_punct_thr: float = 0.12
    line_punct_exclude_zero: bool = False
    short_line_thr: float = 0.67
    short_line_length: int = 30
    char_duplicates_ratio: float = 0.01
    new_line_ratio: float = 0.3

    DATATROVE_FILTER: ClassVar[str] = "FineWebQualityFilter"  # in datatrove.pipeline.filters
    REASON_PREFIX: ClassVar[str] = "fineweb_"  # our reason code = this + datatrove's reason name
    REASON_CODES: ClassVar[tuple[str, ...]] = (
        "fineweb_empty", "fineweb_line_punct_ratio", "fineweb_short_line_ratio", "fineweb_char_dup_ratio",
        "fineweb_list_ratio",
    )

    def _first_failure(self, text: str) -> str | None:
        lines = [line for line in text.split("\n") if line.strip() != ""]
        if not lines:
            return "fineweb_empty"
        ratio = sum(1 for line in lines if line[-1] in TERMINAL_PUNCTUATION) / len(lines)
        if ratio < self.line_punct_thr and not (ratio == 0 and self.line_punct_exclude_zero):
            return "fineweb_line_punct_ratio"
        if sum(1 for line in lines if len(line) <= self.short_line_length) / len(lines) > self.short_line_thr:
            return "fineweb_short_line_ratio"
        if duplicates(lines)[1] / len(text.replace("\n", "")) > self.char_duplicates_ratio:
            return "fineweb_char_dup_ratio"
        n_words = len(spacy_text.words(text))
        if n_words and text.count("\n") / n_words > self.new_line_ratio:
            return "fineweb_list_ratio"
        return None


RULE_FILTERS: dict[str, type] = {  # the order of datatrove's FineWeb pipeline
    "gopher_repetition": GopherRepetition,
    "gopher_quality": GopherQuality,
    "c4": C4,
    "fineweb": FineWeb,
}
