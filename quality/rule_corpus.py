"""A seeded corpus that makes every rule filter's rule fire, for checking decisions against datatrove.

Each document is drawn from one of the kinds in ``KINDS`` (prose, prose with citations or trailing spaces, code,
bullet lists, boilerplate with policy and javascript lines, repeated lines, paragraphs and n-grams, lorem ipsum,
curly brackets, short documents, hashtags, ellipses, unicode punctuation, number tables, long words and URLs,
capitalised stop words, other line breaks, blank text) with randomised sizes, and a quarter of the documents mix
two kinds, so thresholds are crossed from both sides. Prose comes from the stdlib's docstrings and pydoc topics
(``models.corpus``); nothing is downloaded.

``ADVERSARIAL`` makes the texts that cost a rule most per character (runs of punctuation without whitespace, colons,
only whitespace, many short lines...): the linear-time tests and reliability scenario R7 time them at growing sizes.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable

from prunefusion.quality.mixed_corpus import BOILERPLATE, LOREM, Document, code_snippets

UNICODE_PUNCTUATION = ("…", "！", "。", "？", "”", "“", "«", "»", "—", "–", "•", "·", "、", "؟", "।")


def _prose(rng: random.Random, sentences: list[str], lines: int | None = None) -> list[str]:
    return [" ".join(rng.sample(sentences, rng.randint(1, 4))) for _ in range(lines or rng.randint(1, 8))]


def _words(rng: random.Random, sentences: list[str], n: int) -> list[str]:
    return [w for s in rng.sample(sentences, 4) for w in s.split()][:n] or ["word"]


def _with_citations(rng, sentences):
    marks = ("[1]", "[12]", "[]", "[edit]", "[citation needed]", "[Edit]")
    return [line + rng.choice(marks) if rng.random() < 0.6 else line for line in _prose(rng, sentences)]


def _trailing_spaces(rng, sentences):
    return [line + " " * rng.randint(1, 3) if rng.random() < 0.5 else line for line in _prose(rng, sentences)]


def _bullets(rng, sentences):
    marks = ("- ", "• ", "* ", "  - ", "·", "‣ ", "")
    words = _words(rng, sentences, 60)
    return [rng.choice(marks) + " ".join(rng.sample(words, min(len(words), rng.randint(1, 9))))
            for _ in range(rng.randint(2, 25))]


def _consistent_bullets(rng, sentences):
    mark = rng.choice(("- ", "• ", "-", "  • "))
    lines = [mark + line for line in _prose(rng, sentences, rng.randint(5, 30))]
    return lines if rng.random() < 0.7 else [*lines, *_prose(rng, sentences, rng.randint(1, 3))]


def _short_words(rng, sentences):
    tiny = ("a", "to", "of", "in", "it", "is", "be", "an", "or", "by", "on", "at", "go", "so", "the", "and")
    return [" ".join(rng.choice(tiny) for _ in range(rng.randint(5, 20))) + "." for _ in range(rng.randint(3, 12))]


def _few_long_words(rng, sentences):
    long = [w.strip(".,()\"") for w in _words(rng, sentences, 80) if len(w) > 9] or ["extraordinarily"]
    return [" ".join(rng.choice(long) for _ in range(rng.randint(1, 4))) + rng.choice((".", "", "!"))
            for _ in range(rng.randint(5, 40))]


def _dots(rng, sentences):
    return [line + " ... " * rng.randint(1, 6) + "... more" for line in _prose(rng, sentences, rng.randint(1, 5))]


def _huge(rng, sentences):
    return [" ".join(_prose(rng, sentences, 20)) for _ in range(rng.randint(280, 400))]  # > 100,000 words


def _boilerplate(rng, sentences):
    extra = ("Please enable JavaScript.", "We use cookies to improve this site.", "Read our privacy policy.",
             "By continuing you accept the terms of use.")
    pool = list(BOILERPLATE) + list(extra)
    return [rng.choice(pool) for _ in range(rng.randint(2, 14))] + _prose(rng, sentences, rng.randint(0, 4))


def _repeated_lines(rng, sentences):
    lines = _prose(rng, sentences, rng.randint(1, 6))
    return [rng.choice(lines) for _ in range(rng.randint(3, 15))]


def _repeated_paragraphs(rng, sentences):
    paragraphs = ["\n".join(_prose(rng, sentences, rng.randint(1, 3))) for _ in range(rng.randint(1, 4))]
    return "\n\n".join(rng.choice(paragraphs) for _ in range(rng.randint(2, 8))).split("\n")


def _repeated_ngrams(rng, sentences):
    phrase = " ".join(_words(rng, sentences, rng.randint(2, 12)))
    lines = _prose(rng, sentences, rng.randint(1, 5))
    return [f"{line} {phrase} {phrase}" if rng.random() < 0.7 else line for line in lines]


def _ngram_share(rng, sentences):
    """A phrase said twice, sized so that its repeat is 10-16% of the text: across the duplicated n-gram limits."""
    lines = _prose(rng, sentences, rng.randint(3, 8))
    share = rng.choice((0.105, 0.115, 0.125, 0.135, 0.145, 0.155)) + rng.uniform(-0.004, 0.004)
    base = sum(map(len, lines)) + len(lines) + 3
    words = [w for s in rng.sample(sentences, 8) for w in s.split()]
    phrase: list[str] = []
    while words and sum(map(len, phrase)) < share * (base + 2 * len(" ".join(phrase))):
        phrase.append(words.pop())
    lines.insert(rng.randint(0, len(lines)), " ".join(phrase))
    lines.insert(rng.randint(0, len(lines)), " ".join(phrase) + ".")
    return lines


def _long_paragraph_twice(rng, sentences):
    """Short paragraphs and one long one said twice: few duplicate paragraphs, many duplicate characters."""
    paragraphs = [" ".join(_words(rng, sentences, rng.randint(3, 12))) for _ in range(rng.randint(3, 7))]
    long = "\n".join(_prose(rng, sentences, rng.randint(2, 6)))
    paragraphs[rng.randint(0, len(paragraphs) - 1)] = long
    paragraphs.insert(rng.randint(0, len(paragraphs)), long)
    return "\n\n".join(paragraphs).split("\n")


def _lorem(rng, sentences):
    return _prose(rng, sentences, rng.randint(0, 6)) + [LOREM if rng.random() < 0.7 else LOREM.lower().rstrip(".")]


def _curly(rng, sentences):
    lines = _prose(rng, sentences)
    lines.insert(rng.randint(0, len(lines)), rng.choice(("The set {1, 2} has two items.", "Use {name}", "{")))
    return lines


def _short(rng, sentences):
    return [" ".join(_words(rng, sentences, rng.randint(1, 40)))]


def _hashtags(rng, sentences):
    return [line + " " + " ".join(f"#{w}" for w in _words(rng, sentences, rng.randint(1, 8)))
            for line in _prose(rng, sentences, rng.randint(1, 5))]


def _ellipses(rng, sentences):
    ends = ("...", "…", " ...", "....", ". . .")
    return [line.rstrip(".") + rng.choice(ends) if rng.random() < 0.6 else line for line in _prose(rng, sentences)]


def _unicode_punctuation(rng, sentences):
    return [line.rstrip(".") + rng.choice(UNICODE_PUNCTUATION) + rng.choice(("", " ", "”"))
            for line in _prose(rng, sentences)]


def _numbers(rng, sentences):
    rows = [" ".join(str(rng.randint(0, 10 ** rng.randint(1, 6))) for _ in range(rng.randint(2, 8)))
            for _ in range(rng.randint(2, 20))]
    return rows + _prose(rng, sentences, rng.randint(0, 3))


def _long_words(rng, sentences):
    url = "https://example.org/" + "/".join(_words(rng, sentences, 6)).replace(".", "")
    giant = "x" * rng.choice((20, 999, 1001, 3000))
    return [f"{line} {rng.choice((url, giant))}." for line in _prose(rng, sentences, rng.randint(1, 6))]


def _capitalised(rng, sentences):
    return [line.replace(" the ", " The ").replace(" and ", " AND ").replace(" of ", " Of ")
            for line in _prose(rng, sentences)]


def _line_breaks(rng, sentences):
    joiner = rng.choice(("\r\n", "\r", "\u2028", "\n\n\n", "\n \n", "\x0c"))
    return [joiner.join(_prose(rng, sentences))]


@functools.cache
def _snippets() -> tuple[str, ...]:
    return tuple(code_snippets())


def _code(rng, sentences):
    return rng.choice(_snippets()).split("\n")


def _blank(rng, sentences):
    return [rng.choice(("", " ", "\n", "\n\n \n", "\t"))]


KINDS: dict[str, Callable[[random.Random, list[str]], list[str]]] = {
    "prose": _prose, "citations": _with_citations, "trailing_spaces": _trailing_spaces, "code": _code,
    "bullets": _bullets, "consistent_bullets": _consistent_bullets, "short_words": _short_words,
    "few_long_words": _few_long_words, "dots": _dots, "boilerplate": _boilerplate, "repeated_lines": _repeated_lines,
    "repeated_paragraphs": _repeated_paragraphs, "repeated_ngrams": _repeated_ngrams, "ngram_share": _ngram_share,
    "long_paragraph_twice": _long_paragraph_twice, "lorem": _lorem, "curly": _curly, "short": _short,
    "hashtags": _hashtags, "ellipses": _ellipses, "unicode_punctuation": _unicode_punctuation, "numbers": _numbers,
    "long_words": _long_words, "capitalised": _capitalised, "line_breaks": _line_breaks, "blank": _blank,
    "huge": _huge,
}
HUGE_SHARE = 0.002  # documents of over 100,000 words (about 0.7 MB each): rare, they dominate the time


def rule_corpus(n_documents: int = 1000, seed: int = 0, sentences: list[str] | None = None) -> list[Document]:
    """`n_documents` documents; kinds are drawn uniformly (prose three times as often, "huge" at ``HUGE_SHARE``),
    a quarter of them mix two kinds."""
    from prunefusion.models.corpus import prose_sentences, stdlib_corpus

    rng = random.Random(seed)
    sentences = sentences or prose_sentences(stdlib_corpus().train)
    names = [kind for kind in KINDS if kind != "huge"] + ["prose", "prose"]
    docs = []
    for _ in range(n_documents):
        kinds = [rng.choice(names) for _ in range(2 if rng.random() < 0.25 else 1)]
        if rng.random() < HUGE_SHARE:
            kinds = ["huge"]
        lines = [line for kind in kinds for line in KINDS[kind](rng, sentences)]
        separator = "\n\n" if rng.random() < 0.3 else "\n"
        docs.append(Document(separator.join(lines), "+".join(kinds)))
    return docs


# -- adversarial texts: what made a rule super-linear (issue 17) or could. Each makes a text of about n characters
_PUNCTUATION = "()\"'.!?,;:[]"


def _random_run(n: int, alphabet: str, seed: int = 17) -> str:
    """Seeded, ending in "." at every size (so that a rule's early exits do not depend on the size)."""
    rng = random.Random(seed)
    return "".join(rng.choice(alphabet) for _ in range(n - 1)) + "."


ADVERSARIAL: dict[str, Callable[[int], str]] = {
    "dots": lambda n: "." * n,  # no whitespace at all, in each of these first eight
    "bangs_questions": lambda n: "!?" * (n // 2),  # spaCy peeled one suffix at a time: 16,000 took 28 s
    "quotes_dots": lambda n: '."' * (n // 2),
    "brackets": lambda n: "(" * n,  # one prefix at a time
    "one_letter": lambda n: "a" * n,
    "dots_letters": lambda n: ".a" * (n // 2),
    "colons": lambda n: "a:" * (n // 2),  # spaCy's URL pattern backtracks over colons
    "random_punctuation": lambda n: _random_run(n, _PUNCTUATION),
    "punctuation_words": lambda n: _random_run(n, _PUNCTUATION + " "),  # fresh short runs: no tokenizer cache hits
    "dots_in_a_sentence": lambda n: "It was said " + "." * n + "x.",  # C4's sentence regex (gopher-paper): 11 s at 16k
    "spaces": lambda n: " " * n,
    "newlines": lambda n: "\n" * n,
    "blank_lines": lambda n: " \n" * (n // 2),
    "short_lines": lambda n: "a.\n" * (n // 3),
    "long_line": lambda n: " ".join(f"w{i}" for i in range(n // 7)),  # one line of distinct words
    "repeated_word": lambda n: "the " * (n // 4),  # every n-gram repeats
}
