"""A word-level tokenizer for the shapes world's small language (saved as vocab.json beside the weights)."""

from __future__ import annotations

import json
import re
from pathlib import Path

SPECIALS = ("<pad>", "<bos>", "<eos>", "<boi>", "<eoi>", "<unk>")  # ids 0..5, matching TransfusionConfig's defaults


class WordTokenizer:
    def __init__(self, words: list[str]) -> None:
        self.vocab = list(SPECIALS) + [w for w in words if w not in SPECIALS]
        self.ids = {w: i for i, w in enumerate(self.vocab)}
        self.pad_id, self.bos_id, self.eos_id, self.boi_id, self.eoi_id, self.unk_id = range(len(SPECIALS))

    def __len__(self) -> int:
        return len(self.vocab)

    @staticmethod
    def words(text: str) -> list[str]:
        return re.findall(r"[a-z0-9]+", text.lower())

    def encode(self, text: str) -> list[int]:
        return [self.ids.get(w, self.unk_id) for w in self.words(text)]

    def unknown_words(self, text: str) -> list[str]:
        return [w for w in self.words(text) if w not in self.ids]

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.vocab[i] for i in ids if i >= len(SPECIALS) and i < len(self.vocab))

    def save(self, directory: Path) -> None:
        (Path(directory) / "vocab.json").write_text(json.dumps(self.vocab, indent=0) + "\n")

    @classmethod
    def load(cls, directory: Path) -> WordTokenizer:
        vocab = json.loads((Path(directory) / "vocab.json").read_text())
        if tuple(vocab[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"{directory}/vocab.json does not start with the special tokens {SPECIALS}")
        return cls(vocab[len(SPECIALS):])
