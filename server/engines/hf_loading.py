"""Load a Hugging Face causal-LM directory safely and describe it."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt")


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
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in model_dir.glob("*.bin"))
        hint = f" (found pickled weights {pickled}; convert them to safetensors)" if pickled else ""
        raise FileNotFoundError(f"{model_dir}: no *.safetensors weights{hint}")
    return files


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    family: str
    num_layers: int
    num_parameters: int
    context_length: int
    eos_token_ids: frozenset[int]
    max_token_chars: int  # the longest vocabulary entry: no token decodes to more characters
    weights_digest: str
    tokenizer_digest: str
    config_digest: str


def _as_set(value) -> set[int]:
    if value is None:
        return set()
    return {int(v) for v in value} if isinstance(value, (list, tuple)) else {int(value)}


def load_causal_lm(model_dir: str | Path, *, device: str = "cpu", dtype: str = "float32",
                   trust_remote_code: bool = False, context_length: int | None = None) -> LoadedModel:
    """Load weights (safetensors only) and tokenizer from a local directory; never touches the network."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: not a Hugging Face model directory (no config.json)")
    weights = weight_files(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=getattr(torch, dtype), use_safetensors=True, trust_remote_code=trust_remote_code,
        local_files_only=True).to(device).eval()
    text_config = model.config.get_text_config()
    eos = _as_set(getattr(text_config, "eos_token_id", None)) | _as_set(tokenizer.eos_token_id)
    if (model_dir / "generation_config.json").is_file():
        eos |= _as_set(GenerationConfig.from_pretrained(model_dir).eos_token_id)
    context = context_length or getattr(text_config, "max_position_embeddings", None)
    if not context:
        raise ValueError(f"{model_dir}: config has no max_position_embeddings; set context_length in the server config")
    return LoadedModel(
        model=model, tokenizer=tokenizer, family=model.config.model_type,
        num_layers=int(text_config.num_hidden_layers),
        num_parameters=sum(p.numel() for p in model.parameters()),
        context_length=int(context), eos_token_ids=frozenset(eos),
        max_token_chars=max(map(len, tokenizer.get_vocab()), default=1),
        weights_digest=digest_files(weights),
        tokenizer_digest=digest_files([model_dir / n for n in TOKENIZER_FILES if (model_dir / n).is_file()]),
        config_digest=digest_files([model_dir / n for n in CONFIG_FILES if (model_dir / n).is_file()]),
    )
