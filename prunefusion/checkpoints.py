"""Facts about a Hugging Face model directory that every layer needs: its weight files, their digests, its
tokenizer. Pure file reading: no torch, no transformers model is built here."""

from __future__ import annotations

import hashlib
from pathlib import Path

CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt")  # digested for cache keys: changing this list rotates every key
# what a saved tokenizer leaves in a directory, whatever its kind (fast, sentencepiece, BPE, WordPiece, tiktoken)
TOKENIZER_PATTERNS = ("tokenizer*", "*.model", "vocab*", "merges.txt", "*.tiktoken", "special_tokens_map.json")


def digest_files(paths: list[Path]) -> str:
    """sha256 over (file name, length, bytes) of each file in name order; '' when there are none."""
    if not paths:
        return ""
    h = hashlib.sha256()
    for path in sorted(paths, key=lambda p: p.name):
        h.update(path.name.encode() + b"\0" + str(path.stat().st_size).encode() + b"\0")
        with path.open("rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    return h.hexdigest()


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors weight files; refuses directories that only hold pickled weights."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in Path(model_dir).glob("*.bin"))
        hint = f" (found pickled weights {pickled}; convert them to safetensors)" if pickled else ""
        raise FileNotFoundError(f"{model_dir}: no *.safetensors weights{hint}")
    return files


def weights_digest(model_dir: Path) -> str:
    return digest_files(weight_files(model_dir))


def present(model_dir: Path, names: tuple[str, ...]) -> list[Path]:
    return [Path(model_dir) / n for n in names if (Path(model_dir) / n).is_file()]


def has_tokenizer_files(model_dir: Path) -> bool:
    return any(next(Path(model_dir).glob(pattern), None) is not None for pattern in TOKENIZER_PATTERNS)


def load_tokenizer(model_dir: Path, *, trust_remote_code: bool = False):
    """The directory's tokenizer, offline. A directory saved without one is a FileNotFoundError that says so (not
    transformers' guess at a slow tokenizer to convert); any other failure is transformers' own."""
    from transformers import AutoTokenizer

    if not has_tokenizer_files(model_dir):
        raise FileNotFoundError(f"no tokenizer in {model_dir} (no tokenizer.json, vocabulary or sentencepiece model); "
                                "save the tokenizer beside the weights (tokenizer.save_pretrained(DIR))")
    return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code, local_files_only=True)


def load_resume_state(path: Path, *, map_location=None, remedy: str) -> dict:
    """A training job's resume state through torch's safe unpickler (`weights_only=True`): tensors, containers and
    Python scalars, nothing called. A file that needs more (a pickle from elsewhere) is refused with a ValueError
    naming it and `remedy` (what the user can do), never executed."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        reason = next((line.strip().split(". Please")[0] for line in str(err).splitlines()
                       if "WeightsUnpickler" in line), "not loadable")  # torch's advice to allowlist it: not ours
        raise ValueError(f"{path} is not a plain resume checkpoint ({reason}); refusing to load it. {remedy}") from None
