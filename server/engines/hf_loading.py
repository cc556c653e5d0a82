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
class Checkpoint:
    """What an engine needs to know about a model directory before (or without) loading its weights in torch."""

    tokenizer: object
    family: str
    num_layers: int
    num_parameters: int  # as model.parameters() counts them (tied weights once)
    context_length: int
    eos_token_ids: frozenset[int]
    max_token_chars: int  # the longest vocabulary entry: no token decodes to more characters
    weights_digest: str
    tokenizer_digest: str
    config_digest: str


@dataclass
class LoadedModel(Checkpoint):
    model: torch.nn.Module


def _as_set(value) -> set[int]:
    if value is None:
        return set()
    return {int(v) for v in value} if isinstance(value, (list, tuple)) else {int(value)}


def count_parameters(config, *, trust_remote_code: bool = False) -> int:
    """The model's parameters (tied weights once, buffers not), from an empty model built on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return sum(p.numel() for p in model.parameters())


def describe_checkpoint(model_dir: str | Path, *, trust_remote_code: bool = False,
                        context_length: int | None = None) -> Checkpoint:
    """Read config, generation config, tokenizer and weight headers of a local directory; never touches the
    network and loads no weights."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: not a Hugging Face model directory (no config.json)")
    weights = weight_files(model_dir)
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code, local_files_only=True)
    text_config = config.get_text_config()
    eos = _as_set(getattr(text_config, "eos_token_id", None)) | _as_set(tokenizer.eos_token_id)
    if (model_dir / "generation_config.json").is_file():
        eos |= _as_set(GenerationConfig.from_pretrained(model_dir).eos_token_id)
    context = context_length or getattr(text_config, "max_position_embeddings", None)
    if not context:
        raise ValueError(f"{model_dir}: config has no max_position_embeddings; set context_length in the server config")
    return Checkpoint(
        tokenizer=tokenizer, family=config.model_type, num_layers=int(text_config.num_hidden_layers),
        num_parameters=count_parameters(config, trust_remote_code=trust_remote_code),
        context_length=int(context), eos_token_ids=frozenset(eos),
        max_token_chars=max(map(len, tokenizer.get_vocab()), default=1),
        weights_digest=digest_files(weights),
        tokenizer_digest=digest_files([model_dir / n for n in TOKENIZER_FILES if (model_dir / n).is_file()]),
        config_digest=digest_files([model_dir / n for n in CONFIG_FILES if (model_dir / n).is_file()]),
    )


def load_causal_lm(model_dir: str | Path, *, device: str = "cpu", dtype: str = "float32",
                   trust_remote_code: bool = False, context_length: int | None = None) -> LoadedModel:
    """Describe the directory, then load its weights (safetensors only) into a transformers model."""
    from transformers import AutoModelForCausalLM

    checkpoint = describe_checkpoint(model_dir, trust_remote_code=trust_remote_code, context_length=context_length)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=getattr(torch, dtype), use_safetensors=True, trust_remote_code=trust_remote_code,
        local_files_only=True).to(device).eval()
    return LoadedModel(**vars(checkpoint), model=model)
