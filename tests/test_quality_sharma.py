"""The Sharma et al. text quality score: filters, weights, line and document formulas (pure Python, fast)."""

from __future__ import annotations

import json

import pytest

from prunefusion.quality.sharma import (
    FILTER_NAMES,
    LINE_FILTERS,
    Weights,
    document_score,
    line_score,
    line_signals,
    split_lines,
    weight_from_perplexity,
)

# (filter, a line that passes, a line that fails)
FILTER_CASES = [
    ("first_char_upper", "Hello world", "hello world"),
    ("first_char_upper", "  Indented start", "3 apples"),
    ("not_all_caps", "Hello World", "HELLO WORLD!"),
    ("word_repetition_ratio", "Go go went gone going", "Go go GO went gone"),  # 1/5 = 0.2 passes; 2/5 fails
    ("word_repetition_ratio", "The cat, the dog and a bird", "The cat saw the dog near the barn"),  # 1/7 vs 2/8
    ("digit_punct_ratio", "The meeting starts at nine today, I think.", "Call 555-1234 now!"),  # 2/8 = 0.25 vs 9/3
    # typographic marks count too: 6 of them over 5 words (ASCII alone would be 1/5)
    ("digit_punct_ratio", "Café “Luna” is open every day of the week for us all.", "Café «Luna» is “open” — daily!"),
    ("no_curly_bracket", "A plain sentence.", "function f() { return 1; }"),
    ("terminal_punctuation", "Is it done?", "It is done,"),
    ("terminal_punctuation", 'He said "stop"', "Read more \u2192"),
    ("stop_words", "The cat and the dog.", "The cat sat on a mat."),
    ("stop_words", "Go to the shop.", "Theory andante together tothe."),  # whole words only
    ("no_javascript_lorem", "Coffee is served.", "Please enable JavaScript to continue."),
    ("no_javascript_lorem", "Ipsum facto lorem.", "Lorem Ipsum dolor sit amet."),
    ("more_than_3_tokens", "one two three four", "one two three"),
    ("words_3_to_256", "one two three", "one two"),
    ("words_3_to_256", " ".join(["word"] * 256), " ".join(["word"] * 257)),
    ("words_3_to_256", "-- alpha beta gamma", "-- -- alpha beta"),  # '--' is a token, not a word
]


@pytest.mark.parametrize(("name", "passing", "failing"), FILTER_CASES)
def test_each_filter_passes_and_fails(name, passing, failing):
    assert LINE_FILTERS[name](passing) is True
    assert LINE_FILTERS[name](failing) is False


def test_filter_table_is_the_ten_parser_free_filters():
    assert set(FILTER_NAMES) == {
        "first_char_upper", "not_all_caps", "word_repetition_ratio", "digit_punct_ratio", "no_curly_bracket",
        "terminal_punctuation", "stop_words", "no_javascript_lorem", "more_than_3_tokens", "words_3_to_256",
    }
    assert {name for name, _, _ in FILTER_CASES} == set(FILTER_NAMES)  # every filter has a pass/fail case


def test_line_signals_agree_with_the_filter_table():
    """line_signals is a shared-work fast path; it must give what each LINE_FILTERS function gives."""
    lines = [line for _, p, f in FILTER_CASES for line in (p, f)] + [
        "",
        "   ",
        "ÜBER ALLES 2024",
        "“Yes” — no.",
        "-- -- --",
        "İstanbul is a city with the sea.",
    ]
    for line in lines:
        assert line_signals(line) == {name: f(line) for name, f in LINE_FILTERS.items()}, line


def test_line_score_is_the_weighted_fraction_of_filters_passed():
    weights = Weights({"first_char_upper": 3.0, "not_all_caps": 1.0, "terminal_punctuation": 2.0, "stop_words": 2.0})
    # passes not_all_caps (1) and stop_words (2, "the" twice), fails first_char_upper (3) and terminal_punctuation (2)
    assert line_score("the cat sat on the mat", weights) == pytest.approx(3 / 8)
    assert line_score("The cat sat on the mat.", weights) == pytest.approx(1.0)
    assert line_score("CAT SAT.", weights) == pytest.approx(5 / 8)  # first_char_upper (3) + terminal_punctuation (2)
    assert line_score("cat sat", weights) == pytest.approx(1 / 8)  # not_all_caps only


def test_uniform_weights_score_the_fraction_of_filters_passed():
    # fails only first_char_upper, terminal_punctuation and stop_words: 7 of 10
    assert line_score("cats sit on mats", Weights.uniform()) == pytest.approx(0.7)


def test_document_score_is_the_token_weighted_mean_of_line_scores():
    weights = Weights({"terminal_punctuation": 1.0, "first_char_upper": 1.0})
    text = "Hello there my friend.\r\n\n   ok then  \nFine but no period here either\n"
    doc = document_score(text, weights)
    assert doc.line_scores == (1.0, 0.0, 0.5)
    assert doc.line_token_counts == (4, 2, 6)
    assert doc.token_count == 12
    assert doc.score == pytest.approx((4 * 1.0 + 2 * 0.0 + 6 * 0.5) / 12)  # 7/12
    assert doc.line_spans == ((0, 22), (28, 35), (38, 68))  # "\r\n\n   " is 6 chars
    assert [text[s:e] for s, e in doc.line_spans] == split_lines(text)
    assert doc.signals["terminal_punctuation"] == pytest.approx(1 / 3)
    assert doc.signals["first_char_upper"] == pytest.approx(2 / 3)
    assert doc.signals["more_than_3_tokens"] == pytest.approx(2 / 3)


def test_document_score_with_a_custom_token_count():
    weights = Weights({"terminal_punctuation": 1.0, "first_char_upper": 1.0})
    text = "Hello there my friend.\nok then\nFine but no period here either"
    doc = document_score(text, weights, tokenize=len)  # characters as tokens: 22, 7, 30
    assert doc.line_token_counts == (22, 7, 30)
    assert doc.score == pytest.approx((22 * 1.0 + 7 * 0.0 + 30 * 0.5) / 59)
    with pytest.raises(ValueError, match="negative"):
        document_score(text, weights, tokenize=lambda line: -1)
    assert document_score(text, weights, tokenize=lambda line: 0).score == 0.0


@pytest.mark.parametrize("text", ["", "  \n\n \t\n"])
def test_empty_document_scores_zero_with_no_lines(text):
    doc = document_score(text, Weights.uniform())
    assert doc.score == 0.0
    assert doc.line_scores == () and doc.line_spans == () and doc.token_count == 0
    assert doc.signals == dict.fromkeys(FILTER_NAMES, 0.0)


def test_split_lines_strips_and_drops_empty_lines():
    assert split_lines("  a b \r\n\n\t c\u2028d \n") == ["a b", "c", "d"]


def test_weight_from_perplexity():
    assert weight_from_perplexity(20.0, 15.0) == pytest.approx(0.25)
    assert weight_from_perplexity(20.0, 25.0) == 0.0  # a filter that raises perplexity weighs nothing
    assert weight_from_perplexity(20.0, 20.0) == 0.0
    for bad in [(0.0, 1.0), (-5.0, 1.0), (float("nan"), 1.0), (20.0, 0.0), (20.0, float("inf"))]:
        with pytest.raises(ValueError):
            weight_from_perplexity(*bad)


def test_weights_round_trip(tmp_path):
    weights = Weights({"stop_words": 0.25, "first_char_upper": 0.5}, {"reference_lm": "pico", "ppl_all": 20.0})
    path = tmp_path / "weights.json"
    weights.save(path)
    loaded = Weights.load(path)
    assert loaded == weights
    assert loaded.values == {"stop_words": 0.25, "first_char_upper": 0.5}
    assert loaded.provenance == {"reference_lm": "pico", "ppl_all": 20.0}
    assert line_score("The end", loaded) == pytest.approx(0.5 / 0.75)
    assert Weights.load(path) != Weights.uniform()


def test_weights_validation(tmp_path):
    with pytest.raises(ValueError, match="'has_noun'"):
        Weights({"has_noun": 1.0})
    with pytest.raises(ValueError, match="'stop_words'"):
        Weights({"stop_words": -0.1})
    with pytest.raises(ValueError, match="finite"):
        Weights({"stop_words": float("nan")})
    with pytest.raises(ValueError, match="all filter weights are 0"):
        Weights({"stop_words": 0.0})
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"values": {"stop_words": 1.0}}))  # no format marker
    with pytest.raises(ValueError, match="not a Sharma weights file"):
        Weights.load(bad)
    unknown = tmp_path / "unknown.json"
    Weights({"stop_words": 1.0}).save(unknown)
    unknown.write_text(unknown.read_text().replace("stop_words", "has_object"))
    with pytest.raises(ValueError, match="'has_object'"):
        Weights.load(unknown)
