"""Words and sentences exactly as datatrove's English tokenizer gives them: spaCy's blank ``en`` pipeline with its
rule-based ``sentencizer`` (pip-installable, no model download).

datatrove's ``split_into_words`` is the pipeline's tokens, stripped, empties dropped; its ``split_into_sentences``
has one part per spaCy sentence. Here the same tokenizer makes them, faster: over a vocabulary without lexical
attributes (about 6x cheaper per new word; tokenizing never reads them), keeping spaCy's own per-chunk cache
(bounded), and without the pipeline call (the sentencizer only marks sentence starts, it never changes a token; its
rule is applied to the tokens here).

Linear time (issue 17): spaCy's tokenizer is quadratic in the length of a whitespace-free run that it peels affix by
affix (each step searches the whole rest of the run for a suffix) and its URL pattern is quadratic in the colons of
a run: 16,000 characters of '!?' took 28 s, so 1 MB would take hours. Two changes make it linear:
- the suffix search looks at the end of the string only (``_EndSearch``; exact, its result is spaCy's own);
- a run longer than ``RUN_CHARS`` that would take spaCy more than ``RUN_STEPS`` affix steps or holds more than
  ``RUN_COLONS`` colons is tokenized as if a space followed every ``RUN_CHARS``-th character of it (``_bounded``).
The second is the one divergence from datatrove, on such runs only: ordinary text (words, URLs, a 3,000-letter
word, a paragraph of Chinese) has none, and there datatrove itself takes seconds to hours.
"""

from __future__ import annotations

import functools
import re
import unicodedata


@functools.cache
def english():
    """spaCy's blank English pipeline with a sentencizer, made once per process (about 50 ms)."""
    try:
        import spacy
    except ImportError as err:  # spaCy is a dependency of prunefusion; an environment that lost it
        raise ValueError("the datatrove rule profile needs spaCy (a dependency of prunefusion: reinstall it), "
                         "or pick rule_profile 'gopher-paper'") from err
    nlp = spacy.blank("en")
    nlp.add_pipe("sentencizer")
    return nlp


@functools.cache
def _tokenizer():
    """The blank pipeline's tokenizer (same rules, prefixes, suffixes, infixes, URL match, heuristics) over a bare
    vocabulary: no lexical attributes (is_stop, like_num, shape...), which tokenizing never reads but which make
    every new word about 6x dearer."""
    from spacy.tokenizer import Tokenizer
    from spacy.vocab import Vocab

    t = english().tokenizer
    return Tokenizer(Vocab(), rules=t.rules, prefix_search=t.prefix_search, suffix_search=_EndSearch(t.suffix_search),
                     infix_finditer=t.infix_finditer, token_match=t.token_match, url_match=t.url_match,
                     faster_heuristics=t.faster_heuristics)


@functools.lru_cache(maxsize=4)  # the Gopher families tokenize the same text one after the other
def words(text: str) -> tuple[str, ...]:
    """datatrove's ``split_into_words(text, "eng")``: spaCy's tokens without the whitespace-only ones, from the
    blank pipeline's tokenizer over a bare vocabulary (``_tokenizer``). The whole text goes through it at once: a
    chunk-at-a-time shortcut is not exact, since spaCy's special-case matcher lets neighbouring chunks interact
    (":" then "(:t" tokenizes "(:" differently with and without a newline between them)."""
    return tuple(token for token in _tokens(text) if not token.isspace())


def _tokens(text: str) -> list[str]:
    """Every token of the text, whitespace-only ones included. spaCy's own per-chunk cache makes a chunk seen
    before cheap (datatrove's memory zone empties it after every call); the tokenizer, its cache and its strings
    are dropped and made afresh past ``_MAX_STRINGS`` strings, so a scoring worker does not grow with its corpus."""
    tokenizer = _tokenizer()
    found = [token.text for token in tokenizer(_bounded(text))]
    if len(tokenizer.vocab.strings) > _MAX_STRINGS:
        _tokenizer.cache_clear()
    return found


_MAX_STRINGS = 1 << 19

# -- linear time ------------------------------------------------------------------------------------------------------
# A run is spaCy's unit ("a span between spaces"); these bound what one run may cost. With them the worst text found
# costs about 10 us a character (a token per character), ordinary prose 1.4 us.
RUN_CHARS = 256  # longer runs are checked; a costly one is cut into runs this long
RUN_STEPS = 16  # affix steps (prefix or suffix split off) a long run may take: each costs O(its length)
RUN_COLONS = 16  # spaCy's URL pattern backtracks over every colon: its cost is colons x length
_LONG_RUN = re.compile(rf"(?<!\S)\S{{{RUN_CHARS + 1},}}")  # from a run's start only: linear; \S = not isspace()


def _bounded(text: str) -> str:
    """The text to tokenize: `text` itself, unless it holds a costly long run (``_costly``); each of those gets a
    space after every RUN_CHARS-th character (a single space adds no whitespace token)."""
    if len(text) <= RUN_CHARS:
        return text
    parts, last = [], 0
    for found in _LONG_RUN.finditer(text):
        run = found.group()
        if _costly(run):
            parts += [text[last:found.start()], " ".join(run[i:i + RUN_CHARS] for i in range(0, len(run), RUN_CHARS))]
            last = found.end()
    return "".join([*parts, text[last:]]) if parts else text


def _costly(run: str) -> bool:
    """Whether spaCy would take more than RUN_STEPS affix steps on `run`, or it holds more than RUN_COLONS colons.
    The steps are spaCy's loop (``Tokenizer._split_affixes``: a prefix and a suffix of the rest split off per
    step) without its special-case exits, which only end it sooner: an upper bound, found in RUN_STEPS steps."""
    if run.count(":") > RUN_COLONS:
        return True
    tokenizer = _tokenizer()
    if tokenizer.token_match is not None:  # not the case in English; another language would need its own bound
        return True
    prefix, suffix = tokenizer.prefix_search, tokenizer.suffix_search
    for _ in range(RUN_STEPS):
        found = prefix(run)
        pre = found.end() - found.start() if found else 0
        found = suffix(run[pre:])
        suf = found.end() - found.start() if found else 0
        if not pre and not suf:
            return False
        run = run[pre:len(run) - suf]
        if not run:
            return False
    return True


class _EndSearch:
    """The tokenizer's ``suffix_search`` (``re.search`` over end-anchored alternatives: the leftmost match that
    ends the string), exact and in time bounded by the match instead of the string.

    It searches the last ``window`` characters first. A match there that starts after the window's first character
    is the leftmost of all, because an earlier one would be (a) wider than the window, so one of the unbounded
    alternatives, and each of those (spaCy's ``\\.\\.+$``) is a run of one character class, so (b) it would match
    at the window's first character too. Otherwise the window grows fourfold. Lookbehinds see the characters before
    the window, as in a whole-string search. A pattern of another shape is searched whole (``window`` None).
    """

    def __init__(self, search) -> None:
        self.search = search
        self.window = _end_window(search.__self__)

    def __call__(self, string: str):
        window, n = self.window, len(string)
        while window is not None and n > window:
            found = self.search(string, n - window)
            if found is None or found.start() > n - window:
                return found
            window *= 4
        return self.search(string)


def _end_window(pattern: re.Pattern) -> int | None:
    """A window for ``_EndSearch``: wider than every bounded alternative (plus a trailing newline, which ``$``
    allows), or None when an unbounded alternative is not a run of one character class ending at ``$``."""
    import re._constants as sre
    import re._parser as sre_parse

    tree = sre_parse.parse(pattern.pattern, pattern.flags)
    alternatives = tree.data[0][1][1] if len(tree.data) == 1 and tree.data[0][0] is sre.BRANCH else [tree]
    widest = 1
    for alternative in alternatives:
        low, high = alternative.getwidth()
        if high < sre.MAXREPEAT:
            widest = max(widest, high)
            continue
        *items, end = alternative.data
        if end != (sre.AT, sre.AT_END) or not items:
            return None
        units = [av[2].data[0] if op is sre.MAX_REPEAT and len(av[2].data) == 1 else (op, av) for op, av in items]
        if any(unit[0] not in (sre.LITERAL, sre.IN) or unit != units[0] for unit in units):
            return None
        widest = max(widest, low)
    return widest + 2


def clear_caches() -> None:
    """Forget everything tokenized so far: a fresh tokenizer, built now (about 50 ms), with an empty cache and
    vocabulary (benchmarks: so that no timed run reuses another's work)."""
    words.cache_clear()
    _tokenizer.cache_clear()
    _tokenizer()


def forget_tokens() -> None:
    """Forget the tokens of texts and runs seen so far, keeping the tokenizer (cheap: for timing a call afresh)."""
    words.cache_clear()
    _tokenizer()._flush_cache()


def words_reference(text: str) -> tuple[str, ...]:
    """The slow, obvious definition: one spaCy Doc of the whole text, whitespace-only tokens dropped."""
    nlp = english()
    with nlp.memory_zone():
        return tuple(token.text for token in nlp.tokenizer(text) if not token.is_space)


def sentence_count(text: str) -> int:
    """``len(split_into_sentences(text, "eng"))``: the sentences spaCy's ``sentencizer`` finds, at least one.

    Its rule, over every token including whitespace-only ones: after a token in its ``punct_chars``, the next token
    that is neither punctuation (``is_punct``: every character in a Unicode P* category) nor in ``punct_chars``
    starts a sentence. Applied here to the bare-vocabulary tokenizer's tokens (which have no ``is_punct``);
    ``sentence_count_reference`` runs spaCy's own pipeline, and the two are tested equal.
    """
    punct_chars = _punct_chars()
    count, seen_period = 1, False
    for token in _tokens(text):
        in_punct_chars = token in punct_chars
        if seen_period and not in_punct_chars and not _is_punct(token):
            count, seen_period = count + 1, False
        elif in_punct_chars:
            seen_period = True
    return count


@functools.cache
def _punct_chars() -> frozenset[str]:
    return frozenset(english().get_pipe("sentencizer").punct_chars)


@functools.lru_cache(maxsize=1 << 14)
def _is_punct(token: str) -> bool:
    """spaCy's lexical attribute ``is_punct``."""
    return all(unicodedata.category(c).startswith("P") for c in token)


def sentence_count_reference(text: str) -> int:
    """spaCy's pipeline (tokenizer and sentencizer) over the text: what datatrove runs."""
    nlp = english()
    nlp.max_length = len(text) + 10
    with nlp.memory_zone():
        return max(1, sum(1 for _ in nlp(text).sents))
