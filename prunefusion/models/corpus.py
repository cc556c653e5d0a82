"""A text corpus every Python install carries: the stdlib's pydoc topics and the docstrings of its modules.

Read from source files with `ast` (nothing is imported), in sorted order, so the corpus is the same on every machine
with the same Python version. Documents are split into train and held-out by a hash of their text.
"""

from __future__ import annotations

import ast
import hashlib
import re
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

SKIPPED_PARTS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__"}
MIN_DOC_CHARS = 40


@dataclass(frozen=True)
class Corpus:
    train: list[str]
    held_out: list[str]
    description: str

    @property
    def num_chars(self) -> int:
        return sum(map(len, self.train)) + sum(map(len, self.held_out))


def pydoc_topics() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k].strip() for k in sorted(topics)]


def stdlib_docstrings(root: Path | None = None) -> list[str]:
    root = root or Path(sysconfig.get_paths()["stdlib"])
    docs: list[str] = []
    for path in sorted(root.rglob("*.py")):
        if SKIPPED_PARTS & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= MIN_DOC_CHARS:
                    docs.append(doc)
    return docs


def is_held_out(text: str, every: int) -> bool:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) % every == 0


def stdlib_corpus(held_out_every: int = 20) -> Corpus:
    """pydoc topics + stdlib docstrings, deduplicated; one document in `held_out_every` is held out."""
    docs = list(dict.fromkeys(pydoc_topics() + stdlib_docstrings()))
    train = [d for d in docs if not is_held_out(d, held_out_every)]
    held = [d for d in docs if is_held_out(d, held_out_every)]
    version = ".".join(map(str, sys.version_info[:3]))
    return Corpus(train, held, f"Python {version} stdlib: pydoc_data topics + module/class/function docstrings "
                               f"(>= {MIN_DOC_CHARS} chars), 1 in {held_out_every} documents held out by sha256")


def prose_sentences(documents: list[str], min_chars: int = 40, max_chars: int = 300) -> list[str]:
    """Prose sentences of the documents (for sentence encoders): paragraphs without code or markup, split after
    . ! ? before a capital; deduplicated, in order."""
    out: list[str] = []
    for doc in documents:
        for para in re.split(r"\n\s*\n", doc):
            if ">>>" in para or "::" in para or para.lstrip().startswith(("*", "-", "|", "+", "=")):
                continue
            for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", " ".join(para.split())):
                prose = sum(ch.isalpha() or ch == " " for ch in s) >= 0.85 * len(s)
                if min_chars <= len(s) <= max_chars and prose and s[-1] in ".!?":
                    out.append(s)
    return list(dict.fromkeys(out))


def sentence_splits(held_out_every: int = 20) -> tuple[list[str], list[str]]:
    """(train, held-out) prose sentences of the stdlib corpus; held-out ones that also occur in a training document
    are dropped, so the two never share a sentence."""
    corpus = stdlib_corpus(held_out_every)
    train = prose_sentences(corpus.train)
    seen = set(train)
    return train, [s for s in prose_sentences(corpus.held_out) if s not in seen]

