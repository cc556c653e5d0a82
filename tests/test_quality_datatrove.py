"""The datatrove rule profile against datatrove 0.10.1 itself: the same keep/drop and reason per family and for the
chain, on a seeded corpus that makes every rule fire; its fast parts against datatrove's own helpers."""

from __future__ import annotations

import random

import pytest
from datatrove.data import Document as DatatroveDocument
from datatrove.pipeline import filters as datatrove_filters_module
from datatrove.pipeline.filters.gopher_repetition_filter import find_all_duplicate, find_top_duplicate, get_n_grams
from datatrove.utils.text import split_into_sentences, split_into_words

from prunefusion.quality import ngram_hash, spacy_text
from prunefusion.quality.ngram_hash import HashedNGrams
from prunefusion.quality.rule_corpus import KINDS, rule_corpus
from prunefusion.quality.rule_profiles import DEFAULT_RULE_PROFILE, apply_rules, build_rules
from prunefusion.quality.rules_datatrove import RULE_FILTERS

DATATROVE = {family: getattr(datatrove_filters_module, cls.DATATROVE_FILTER) for family, cls in RULE_FILTERS.items()}
PREFIX = {family: cls.REASON_PREFIX for family, cls in RULE_FILTERS.items()}  # our code = prefix + theirs


def datatrove_verdict(family_filter, text: str) -> tuple[str | None, str]:
    """(our code for datatrove's reason or None when kept, the text datatrove passes on)."""
    document = DatatroveDocument(text=text, id="0")
    result = family_filter.filter(document)
    return (None if result is True else result[1]), document.text


def ours_first(codes: list[str]) -> str | None:
    assert len(codes) <= 1  # datatrove stops at the first failed rule
    return codes[0] if codes else None


@pytest.fixture(scope="module")
def corpus():
    # the seeded draw, then six documents of each kind (the rare "huge" one: once), so that every rule fires
    from prunefusion.models.corpus import prose_sentences, stdlib_corpus

    rng = random.Random(11)
    sentences = prose_sentences(stdlib_corpus().train)
    each = ["\n".join(make(rng, sentences)) for kind, make in KINDS.items() for _ in range(1 if kind == "huge" else 6)]
    return [d.text for d in rule_corpus(300, seed=20261202, sentences=sentences)] + each


def test_every_family_and_the_chain_decide_as_datatrove(corpus):
    ours = build_rules(DEFAULT_RULE_PROFILE, list(RULE_FILTERS))
    filters = {family: cls() for family, cls in DATATROVE.items()}
    fired: dict[str, set] = {family: set() for family in DATATROVE}
    mismatches = []
    for i, text in enumerate(corpus):
        chain, chain_text = None, text  # one Document through datatrove's four filters, in order
        for family, rule in zip(RULE_FILTERS, ours, strict=True):
            reason, kept_text = datatrove_verdict(filters[family], text)
            expected = None if reason is None else PREFIX[family] + reason
            codes, our_text = rule.apply(text)
            fired[family].add(expected)
            if ours_first(codes) != expected or (expected is None and our_text != kept_text):
                mismatches.append((i, family, expected, codes))
            if chain is None:  # the families before C4 keep the text as it is; FineWeb sees what C4 left
                reason, chain_text = (reason, kept_text) if chain_text == text else datatrove_verdict(
                    filters[family], chain_text)
                chain = None if reason is None else PREFIX[family] + reason
        chain_codes, _ = apply_rules(DEFAULT_RULE_PROFILE, ours, text)
        if ours_first(chain_codes) != chain:
            mismatches.append((i, "chain", chain, chain_codes))
    assert not mismatches, f"{len(mismatches)} disagreements, first: {mismatches[:5]}"
    for family, cls in RULE_FILTERS.items():  # the corpus made every rule fire, and each document pass somewhere
        assert fired[family] == {None, *cls.REASON_CODES}, (family, set(cls.REASON_CODES) - fired[family])


@pytest.mark.parametrize(("family", "kwargs"), [
    ("gopher_quality", {"min_doc_words": 20, "min_stop_words": 0, "max_symbol_word_ratio": 0.05}),
    ("gopher_repetition", {"dup_line_frac": 0, "dup_para_frac": 0.5}),
    ("c4", {"filter_no_terminal_punct": False}),  # FineWeb's own recipe
    ("c4", {"min_num_sentences": 2, "min_words_per_line": 5, "remove_citations": False, "filter_policy": False}),
    ("fineweb", {"line_punct_exclude_zero": True, "short_line_length": 60, "new_line_ratio": 0.1}),
])
def test_thresholds_are_datatrove_arguments(corpus, family, kwargs):
    """The same keyword arguments given to datatrove's filter and as our thresholds make the same decisions."""
    [ours] = build_rules(DEFAULT_RULE_PROFILE, [family], {family: kwargs})
    theirs = DATATROVE[family](**kwargs)
    defaults = DATATROVE[family]()
    changed = 0
    for text in corpus[:150]:  # from the seeded draw
        expected, kept_text = datatrove_verdict(theirs, text)
        codes, our_text = ours.apply(text)
        assert ours_first(codes) == (None if expected is None else PREFIX[family] + expected), text[:200]
        assert expected is not None or our_text == kept_text
        changed += expected != datatrove_verdict(defaults, text)[0]
    assert changed  # the override mattered on this corpus


TOKENIZER_CORNERS = [
    ": ) :-) (: ;) <3 </3 o.O O.o", "U.S. A. e.g. i.e. Mr. Dr.", "can't won't y'all cannot Cannot gonna lemme",
    "a\u00a0b\u2028c\x1cd\x85e", "\t\t x \n\n y  z   ", "'s 'S 're (don't)", "http://x.org/a?b=c. www.x.com",
    "10km 5.5kg $3.50 3:30pm", "... — :\n) a.b.c.d ca n't <3<3", "日本語 Ünïcödé ǅemal e\u0301 cafe\u0301", "",
    "Hi.  .", "Hi. .", "Hi.\t.", "“Yes.” he said. ok", "a . . b", "Wait... what?! Yes!!", "x\u00a0. y",
    # special cases that span tokens, next to other chunks (a review found a chunk-at-a-time tokenizer wrong here)
    ":\n(:t", ": (:t", "He said: x.H is here.", "The main finding of the gene: p.Arg loss is large.", ": - ) :-)",
]


def test_words_and_sentences_are_datatrove_english(corpus):
    """The chunked tokenizer equals spaCy over the whole text and datatrove's split_into_words; the sentence rule
    equals spaCy's sentencizer and datatrove's split_into_sentences."""
    for text in [*TOKENIZER_CORNERS, *corpus[:150]]:
        assert spacy_text.words(text) == spacy_text.words_reference(text)
        assert list(spacy_text.words(text)) == split_into_words(text)
        for line in [text, *text.splitlines()[:8]]:
            if line.strip() and len(line) < 20_000:
                expected = spacy_text.sentence_count_reference(line.strip())
                assert spacy_text.sentence_count(line.strip()) == expected == len(split_into_sentences(line.strip()))


def test_special_cases_next_to_other_chunks_decide_as_datatrove():
    """Texts whose tokens depend on the neighbouring chunk: the same verdicts as datatrove, whatever was scored
    before (a cache of per-chunk tokens got these wrong, depending on the order of documents)."""
    prose = ["The study looked at how the p.Arg change affects protein folding in cells and tissue samples over time.",
             "Researchers from several groups measured the folding rate with careful methods and they repeated each "
             "test twice.", "Most of the results agreed with earlier work that had been published by other teams."]
    texts = ["\n".join([*prose, "The main finding of the gene: p.Arg loss is large."]),
             "The cat sat down.\nThe dog ran off.\nA bird flew by.\nHe said: x.H is here.",
             " ".join(f"word{i}" for i in range(47)) + " 1234 5678 " + " , " * 8 + " :\n(:t"]
    ours = build_rules(DEFAULT_RULE_PROFILE, list(RULE_FILTERS))
    filters = {family: cls() for family, cls in DATATROVE.items()}
    for warm in ("", ": x ( : p"):
        spacy_text.clear_caches()
        spacy_text.words(warm)
        for text in texts:
            for family, rule in zip(RULE_FILTERS, ours, strict=True):
                reason, _ = datatrove_verdict(filters[family], text)
                assert ours_first(rule.apply(text)[0]) == (None if reason is None else PREFIX[family] + reason)


def _word_lists(seed: int, count: int = 300):
    """Word lists over a tiny alphabet, so that n-grams repeat and different n-grams share a concatenation."""
    rng = random.Random(seed)
    pieces = ["a", "b", "ab", "ba", "aab", "c"]
    return [[rng.choice(pieces) for _ in range(rng.randint(0, 60))] for _ in range(count)]


def test_hashed_ngrams_equal_datatrove_find_top_and_find_all_duplicate():
    for words in _word_lists(0):
        duplicated = HashedNGrams(words, "", groups=((5,), (6, 7, 8, 9, 10)))
        for n in (2, 3, 4):
            expected = find_top_duplicate(get_n_grams(words, n)) if len(words) >= n else 0
            assert ngram_hash.top_chars(words, n) == expected == ngram_hash.top_chars_reference(words, n)
        for n in range(5, 11):
            assert duplicated.duplicate_chars(n) == find_all_duplicate(words, n)
            assert duplicated.duplicate_chars(n) == ngram_hash.duplicate_chars_reference(words, n)


def test_a_hash_collision_falls_back_to_the_string_loop(monkeypatch):
    """With base 1 the hash is a sum of code points: anagrams collide, and the result must still be exact."""
    import numpy as np

    monkeypatch.setattr(ngram_hash, "BASE", np.uint64(1))
    monkeypatch.setattr(ngram_hash, "BASE_INVERSE", np.uint64(1))
    collided = 0
    for words in _word_lists(1):
        duplicated = HashedNGrams(words, "", groups=((5, 6, 7, 8, 9, 10),))
        for n in range(5, 11):
            collided += duplicated.has(n) and duplicated._collides(n)
            assert duplicated.duplicate_chars(n) == find_all_duplicate(words, n)
    assert collided  # the fallback ran


def test_the_constants_are_datatrove_s():
    from datatrove.pipeline.filters import c4_filters, gopher_quality_filter
    from datatrove.utils import text as datatrove_text

    from prunefusion.quality import rules_datatrove as ours

    assert ours.PUNCTUATION == datatrove_text.PUNCTUATION
    assert ours.TERMINAL_PUNCTUATION == datatrove_text.TERMINAL_PUNCTUATION
    assert ours.PUNCTUATION_SET == datatrove_text.PUNCTUATION_SET
    assert set(gopher_quality_filter.STOP_WORDS) == ours.STOP_WORDS
    assert list(ours.C4_POLICY) == c4_filters.POLICY_SUBSTRINGS
    assert ours.C4_END_PUNCTUATION == c4_filters.END_PUNCTUATION
    assert ours.CITATION.pattern == c4_filters.CITATION_REGEX.pattern


def test_the_end_search_is_spacy_s_suffix_search():
    """The suffix search that looks at a string's end only finds what spaCy's whole-string search finds, on strings
    made of suffix characters, dots (the one unbounded suffix), letters, digits and units, at every length."""
    original = spacy_text.english().tokenizer.suffix_search
    fast = spacy_text._tokenizer().suffix_search
    assert isinstance(fast, spacy_text._EndSearch) and fast.window is not None  # spaCy's suffixes kept their shape
    rng = random.Random(5)
    alphabet = [*".....!?)]}\"'”’,:;", "a", "B", "1", "km", "'s", "°C", "$", "%", "…", "\n", "é", "x.."]
    for _ in range(20_000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, rng.choice((5, 20, 80)))))
        want, got = original(text), fast(text)
        assert (want and want.span()) == (got and got.span()), text


def test_only_costly_runs_are_cut_and_ordinary_long_runs_are_not(corpus):
    """The one divergence from datatrove (spacy_text._bounded): a whitespace-free run over RUN_CHARS characters that
    spaCy would peel more than RUN_STEPS times, or with more than RUN_COLONS colons, is tokenized as if cut every
    RUN_CHARS characters. The test corpus (long words, URLs, code) has no such run; these have one each."""
    assert all(spacy_text._bounded(text) is text for text in corpus)
    ordinary = ["x" * 3000 + ".", "https://example.org/" + "a/" * 400 + "?q=1", "中文的句子，" * 100 + "。",
                "word(" + "a" * 1000 + ")."]
    for text in ordinary:
        assert spacy_text._bounded(text) is text and spacy_text.words(text) == spacy_text.words_reference(text)
    costly = ["(" * 300 + "x", "!?" * 200, "a:" * 200, "x" + "')" * 200]
    for text in costly:
        cut = spacy_text._bounded(text)
        assert cut.replace(" ", "") == text and max(map(len, cut.split(" "))) == spacy_text.RUN_CHARS
        assert spacy_text.words(text) == spacy_text.words_reference(cut)
