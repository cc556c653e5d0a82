"""Incremental detokenization and stop sequences."""

import pytest

from prunefusion.server.engines.text import IncrementalText, find_stop, held_back_length


def test_held_back_length():
    assert held_back_length("hello wor", ["world"]) == 3
    assert held_back_length("hello", ["xyz"]) == 0
    assert held_back_length("ab", ["abc", "b!"]) == 2
    assert held_back_length("abc", ["abc"]) == 0  # a full match is a stop, not a prefix


def test_find_stop_earliest_and_from_offset():
    assert find_stop("one two three", ["three", "two"], 0) == 4
    assert find_stop("abcabc", ["bc"], 4) == 4  # a match ending after offset 4 only
    assert find_stop("abc", ["zz"], 0) == -1


@pytest.fixture(scope="module")
def tokenizer(pico_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(pico_dir)


def feed(tokenizer, text: str, stops=()):
    ids = tokenizer(text, add_special_tokens=False).input_ids
    inc = IncrementalText(tokenizer, [tokenizer.bos_token_id], stops)
    deltas = [inc.add(t) for t in ids]
    if not inc.stopped:
        deltas.append(inc.finish())
    return deltas, inc


@pytest.mark.parametrize("text", ["The os module provides functions.", "naïve café — 日本語 ✓ emoji 🎉!", "  spaces  "])
def test_deltas_concatenate_to_the_decoded_text(tokenizer, text):
    deltas, inc = feed(tokenizer, text)
    assert "".join(deltas) == text == inc.text
    assert all("\ufffd" not in d for d in deltas)


def test_stop_sequence_is_cut_and_never_emitted(tokenizer):
    deltas, inc = feed(tokenizer, "alpha beta STOP gamma", stops=["STOP"])
    assert inc.stopped
    assert "".join(deltas) == "alpha beta "
    assert not any("S" in d for d in deltas)


def test_partial_stop_prefix_is_released_when_it_does_not_match(tokenizer):
    deltas, inc = feed(tokenizer, "a STOX b", stops=["STOP"])
    assert not inc.stopped
    assert "".join(deltas) == "a STOX b"
