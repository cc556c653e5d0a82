"""Load what the compression commands work on: a checkpoint (causal LM or bare encoder) and calibration text."""

from __future__ import annotations

import json
from pathlib import Path

CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def is_causal(config) -> bool:
    return any(a.endswith(CAUSAL_SUFFIXES) for a in (config.architectures or []))


def is_causal_checkpoint(model_dir: Path) -> bool:
    from transformers import AutoConfig

    return is_causal(AutoConfig.from_pretrained(model_dir, local_files_only=True))


def load_model(model_dir: Path):
    """A causal LM, or a bare encoder (BERT/MiniLM) when the checkpoint is not one; safetensors only, offline."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    loader = AutoModelForCausalLM if is_causal_checkpoint(model_dir) else AutoModel
    model = loader.from_pretrained(model_dir, use_safetensors=True, local_files_only=True).eval()
    return model, AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


def load_texts(paths: list[str]) -> list[str]:
    """Plain text (documents split at blank lines), JSONL (a "text" field per line), or a `datasets` directory
    saved with save_to_disk. No paths: the training split of the stdlib corpus the default LM is trained on."""
    if not paths:
        from prunefusion.models.corpus import stdlib_corpus

        return stdlib_corpus().train  # never the held-out documents: they measure the result
    texts: list[str] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
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


def texts_or_default(paths: list[str], causal: bool, split: str) -> list[str]:
    """The text in `paths`; none given: the stdlib corpus' `split` ("train" or "held_out"), as documents for causal
    LMs and as prose sentences for encoders (held-out sentences never occur in training)."""
    if paths:
        return load_texts(paths)
    from prunefusion.models.corpus import sentence_splits, stdlib_corpus

    if split not in ("train", "held_out"):
        raise ValueError(f"split is train or held_out, not {split!r}")
    if causal:
        return getattr(stdlib_corpus(), split)
    train, held_out = sentence_splits()
    return train if split == "train" else held_out

