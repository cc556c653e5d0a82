"""Text to calibrate, heal, evaluate and score on: files in the formats users have, or the project's own corpus."""

from __future__ import annotations

import json
from pathlib import Path

SPLITS = ("train", "held_out")


def load_texts(paths: list[str], unit: str = "documents") -> list[str]:
    """Plain text (documents split at blank lines), JSONL (a "text" field per line), a `datasets` directory
    saved with save_to_disk, or `local:NAME`, a text source of this machine (prunefusion/local_texts.py) in `unit`s
    ("documents", or "sentences" for encoders). No paths: the training split of the stdlib corpus the default LM is
    trained on."""
    if not paths:
        from prunefusion.models.corpus import stdlib_corpus

        return stdlib_corpus().train  # never the held-out documents: they measure the result
    texts: list[str] = []
    for raw in paths:
        path = Path(raw)
        if str(raw).startswith("local:"):
            from prunefusion.local_texts import local_texts

            texts += local_texts(str(raw), unit)
        elif path.is_dir():
            from datasets import load_from_disk

            texts += [t for t in load_from_disk(str(path))["text"] if t and t.strip()]
        elif path.suffix == ".jsonl":
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if line.strip():
                    try:
                        texts.append(json.loads(line)["text"])
                    except (json.JSONDecodeError, KeyError) as err:
                        raise ValueError(f"{path}:{number}: expected a JSON object with a 'text' field") from err
        else:
            texts += [d.strip() for d in path.read_text().split("\n\n") if d.strip()]
    if not texts:
        raise ValueError(f"no text found in {paths}")
    return texts


def default_texts(unit: str, split: str) -> list[str]:
    """The stdlib corpus' `split` ("train" or "held_out") as `unit`s: "documents" (for causal LMs) or "sentences"
    (prose sentences, for encoders; held-out sentences never occur in training)."""
    from prunefusion.models.corpus import sentence_splits, stdlib_corpus

    if split not in SPLITS:
        raise ValueError(f"split is train or held_out, not {split!r}")
    if unit == "documents":
        return getattr(stdlib_corpus(), split)
    train, held_out = sentence_splits()
    return train if split == "train" else held_out
