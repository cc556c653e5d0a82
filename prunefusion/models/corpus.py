"""A text corpus every Python install carries: the stdlib's pydoc topics and the docstrings of its modules.

Read from source files with `ast` (nothing is imported), in sorted order, so the corpus is the same on every machine
with the same Python version. Documents are split into train and held-out by a hash of their text.
"""

from __future__ import annotations

import ast
import hashlib
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
