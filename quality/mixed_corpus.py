"""A seeded corpus of clean prose mixed with realistic junk, built from what every Python install carries.

Clean documents are paragraphs of prose sentences from the stdlib's docstrings and pydoc topics. Junk documents
imitate what web crawls are full of: navigation and cookie boilerplate, the same lines repeated, code dumps (stdlib
source), bare lists, and lorem ipsum. Each document records its kind, so filters can be checked against it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

BOILERPLATE = ("Home | About | Contact | Privacy Policy | Terms of Use", "Accept all cookies",
               "Click here to subscribe!",
               "Share on Facebook Share on Twitter Share by Email", "All rights reserved.", "Skip to main content",
               "Log in   Sign up   Forgot password?", "Please enable JavaScript to view the comments.",
               "This website uses cookies to improve your experience.", "Next page >>", "Copyright 2024 Example Inc.",
               "Menu", "Search...", "Related posts", "Advertisement", "Back to top")
LOREM = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore et "
         "dolore magna aliqua.")
JUNK_KINDS = ("boilerplate", "repeated", "code", "list", "lorem")


@dataclass(frozen=True)
class Document:
    text: str
    kind: str  # "clean" or one of JUNK_KINDS


def _clean_documents(rng: random.Random, n: int, sentences: list[str]) -> list[Document]:
    docs = []
    for _ in range(n):
        paragraphs = [" ".join(rng.sample(sentences, rng.randint(3, 6))) for _ in range(rng.randint(2, 4))]
        docs.append(Document("\n\n".join(paragraphs), "clean"))
    return docs


def code_snippets(limit: int = 400) -> list[str]:
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    snippets = []
    for path in sorted(root.glob("*.py"))[:200]:
        lines = [ln for ln in path.read_text(errors="ignore").splitlines() if ln.strip()]
        for start in range(0, max(len(lines) - 15, 1), 60):
            snippets.append("\n".join(lines[start:start + 15]))
        if len(snippets) >= limit:
            break
    return snippets


def _junk(kind: str, rng: random.Random, sentences: list[str], code: list[str]) -> str:
    if kind == "boilerplate":
        return "\n".join(rng.choice(BOILERPLATE) for _ in range(rng.randint(6, 14)))
    if kind == "repeated":
        line = rng.choice(sentences + list(BOILERPLATE))
        return "\n".join([line] * rng.randint(5, 12))
    if kind == "code":
        return rng.choice(code)
    if kind == "list":
        words = [w.strip(".,;:()").lower() for s in rng.sample(sentences, 5) for w in s.split()]
        return "\n".join(f"- {' '.join(rng.sample(words, rng.randint(1, 3)))}" for _ in range(rng.randint(6, 15)))
    return "\n".join([LOREM] * rng.randint(1, 4))


def mixed_corpus(n_documents: int = 2000, junk_fraction: float = 0.4, seed: int = 0,
                 sentences: list[str] | None = None) -> list[Document]:
    """`n_documents` documents, `junk_fraction` of them junk (kinds in equal shares), shuffled with `seed`."""
    from prunefusion.models.corpus import prose_sentences, stdlib_corpus

    rng = random.Random(seed)
    sentences = sentences or prose_sentences(stdlib_corpus().train)
    code = code_snippets()
    n_junk = round(n_documents * junk_fraction)
    docs = _clean_documents(rng, n_documents - n_junk, sentences)
    docs += [Document(_junk(JUNK_KINDS[i % len(JUNK_KINDS)], rng, sentences, code), JUNK_KINDS[i % len(JUNK_KINDS)])
             for i in range(n_junk)]
    rng.shuffle(docs)
    return docs


def with_near_duplicates(docs: list[Document], fraction: float = 0.1, seed: int = 0) -> list[Document]:
    """`docs` plus near-copies of a seeded `fraction` of them (whitespace doubled, a word's case changed; kind
    "near_duplicate"), each inserted at a random place, so a corpus split into units has its copies in other units."""
    rng = random.Random(seed)
    out = list(docs)
    for doc in rng.sample(docs, round(len(docs) * fraction)):
        words = doc.text.split(" ")
        i = rng.randrange(len(words))
        words[i] = words[i].upper()
        out.insert(rng.randrange(len(out) + 1), Document("  ".join(words), "near_duplicate"))
    return out
