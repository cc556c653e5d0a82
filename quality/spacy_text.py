"""Words and sentences exactly as datatrove's English tokenizer gives them: spaCy's blank ``en`` pipeline with its
rule-based ``sentencizer`` (pip-installable, no model download).

datatrove's ``split_into_words`` is the pipeline's tokens, stripped, empties dropped; its ``split_into_sentences``
has one part per spaCy sentence. Here the same spaCy objects make them, faster: words from the tokenizer alone
(the sentencizer only marks sentence starts, it never changes a token), one chunk between whitespace at a time
(see ``words``), inside ``memory_zone`` so that a scoring worker does not grow with its corpus.
"""

from __future__ import annotations

import functools
import itertools
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
    return Tokenizer(Vocab(), rules=t.rules, prefix_search=t.prefix_search, suffix_search=t.suffix_search,
                     infix_finditer=t.infix_finditer, token_match=t.token_match, url_match=t.url_match,
                     faster_heuristics=t.faster_heuristics)


@functools.lru_cache(maxsize=4)  # the Gopher families tokenize the same text one after the other
def words(text: str) -> tuple[str, ...]:
    """datatrove's ``split_into_words(text, "eng")``: spaCy's tokens without the whitespace-only ones.

    spaCy's tokenizer cuts the text at whitespace (``str.isspace``, as ``str.split``) and tokenizes each chunk on
    its own: its cache is keyed by the chunk, and a special case never spans whitespace. So the words are the
    chunks' tokens in order, and each distinct chunk needs spaCy once (``_learn``). ``words_reference`` is the
    whole-text spaCy call this equals (tested on every kind of the rule corpus and on tokenizer corner cases).
    """
    chunks = text.split()
    if len(_CHUNKS) > _MAX_CHUNKS:  # bounded: a worker's memory does not grow with its corpus
        _CHUNKS.clear()
    missing = [chunk for chunk in dict.fromkeys(chunks) if chunk not in _CHUNKS]
    if missing:
        _learn(missing)
    return tuple(itertools.chain.from_iterable(map(_CHUNKS.__getitem__, chunks)))


_CHUNKS: dict[str, tuple[str, ...]] = {}  # chunk -> its spaCy tokens
_MAX_CHUNKS = 1 << 18


def clear_caches() -> None:
    """Forget every chunk and text tokenized so far (benchmarks: so that no timed run reuses another's work)."""
    _CHUNKS.clear()
    words.cache_clear()


def _learn(chunks: list[str]) -> None:
    """Tokenize new chunks: letters only and not a special case ("cannot" is one) -> the chunk itself, since every
    English prefix, suffix and infix rule needs a character that is not a letter; the rest in one spaCy call over
    the chunks joined by single spaces (a single space makes no token), cut back into chunks by token offsets."""
    tokenizer = _tokenizer()
    special = tokenizer.rules
    rest = []
    for chunk in chunks:
        if chunk.isalpha() and chunk not in special:
            _CHUNKS[chunk] = (chunk,)
        else:
            rest.append(chunk)
    if not rest:
        return
    with tokenizer.vocab.memory_zone():  # frees the strings spaCy added, so its vocabulary does not grow either
        tokens = [(token.idx, token.text) for token in tokenizer(" ".join(rest))]
    k, start, found = 0, 0, []
    for idx, token in tokens:
        while idx >= start + len(rest[k]):
            _CHUNKS[rest[k]] = tuple(found)
            k, start, found = k + 1, start + len(rest[k]) + 1, []
        found.append(token)
    _CHUNKS[rest[k]] = tuple(found)


def words_reference(text: str) -> tuple[str, ...]:
    """The slow, obvious definition: one spaCy Doc of the whole text, whitespace-only tokens dropped."""
    nlp = english()
    with nlp.memory_zone():
        return tuple(token.text for token in nlp.tokenizer(text) if not token.is_space)


def sentence_count(text: str) -> int:
    """``len(split_into_sentences(text, "eng"))``: the sentences spaCy's ``sentencizer`` finds, at least one.

    Its rule, over every token including whitespace-only ones: after a token in its ``punct_chars``, the next token
    that is neither punctuation (``is_punct``: every character in a Unicode P* category) nor in ``punct_chars``
    starts a sentence. Whitespace between two chunks is a token unless it is exactly one space.
    ``sentence_count_reference`` runs spaCy's own pipeline; the two are tested equal.
    """
    punct_chars = _punct_chars()
    count, seen_period = 1, False
    for piece in _SPACE_RUNS.split(text):
        if not piece:
            continue
        if piece.isspace():
            tokens = (piece,) if piece != " " else ()
        else:
            if piece not in _CHUNKS:
                _learn([piece])
            tokens = _CHUNKS[piece]
        for token in tokens:
            in_punct_chars = token in punct_chars
            if seen_period and not in_punct_chars and not _is_punct(token):
                count, seen_period = count + 1, False
            elif in_punct_chars:
                seen_period = True
    return count


_SPACE_RUNS = re.compile(r"(\s+)")


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
