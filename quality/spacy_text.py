"""Words and sentences exactly as datatrove's English tokenizer gives them: spaCy's blank ``en`` pipeline with its
rule-based ``sentencizer`` (pip-installable, no model download).

datatrove's ``split_into_words`` is the pipeline's tokens, stripped, empties dropped; its ``split_into_sentences``
has one part per spaCy sentence. Here the same tokenizer makes them, faster: over a vocabulary without lexical
attributes (about 6x cheaper per new word; tokenizing never reads them), keeping spaCy's own per-chunk cache
(bounded), and without the pipeline call (the sentencizer only marks sentence starts, it never changes a token; its
rule is applied to the tokens here).
"""

from __future__ import annotations

import functools
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
    return Tokenizer(Vocab(), rules=t.rules, prefix_search=t.prefix_search, suffix_search=t.suffix_search,
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
    found = [token.text for token in tokenizer(text)]
    if len(tokenizer.vocab.strings) > _MAX_STRINGS:
        _tokenizer.cache_clear()
    return found


_MAX_STRINGS = 1 << 19


def clear_caches() -> None:
    """Forget everything tokenized so far: a fresh tokenizer, built now (about 50 ms), with an empty cache and
    vocabulary (benchmarks: so that no timed run reuses another's work)."""
    words.cache_clear()
    _tokenizer.cache_clear()
    _tokenizer()


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
