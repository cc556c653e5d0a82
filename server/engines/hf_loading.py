"""Load a Hugging Face causal-LM directory safely and describe it (what every text engine knows of its model)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from prunefusion.checkpoints import CONFIG_FILES, TOKENIZER_FILES, digest_files, load_tokenizer, present, weight_files
from prunefusion.server.engines.base import ModelInfo


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

    def model_info(self, cfg, *, engine: str, device: str) -> ModelInfo:
        """The ModelInfo of `cfg` (a TextModelConfig) served from this checkpoint by `engine` on `device`."""
        return ModelInfo(
            name=cfg.name, family=self.family, num_layers=self.num_layers, num_parameters=self.num_parameters,
            weights_digest=self.weights_digest, tokenizer_digest=self.tokenizer_digest,
            config_digest=self.config_digest, device=device, dtype=cfg.dtype, engine=engine,
            context_length=self.context_length, max_new_tokens_limit=cfg.max_new_tokens_limit,
            default_max_new_tokens=cfg.default_max_new_tokens, path=str(cfg.resolved_path))


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
    from transformers import AutoConfig, GenerationConfig

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: not a Hugging Face model directory (no config.json)")
    weights = weight_files(model_dir)
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code, local_files_only=True)
    tokenizer = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
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
        tokenizer_digest=digest_files(present(model_dir, TOKENIZER_FILES)),
        config_digest=digest_files(present(model_dir, CONFIG_FILES)),
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
