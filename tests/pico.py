"""Pico models for tests: built from a config in seconds, random weights (correctness, not quality)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from prunefusion.models.corpus import pydoc_topics
from prunefusion.models.tokenizer import train_bpe_tokenizer


def build_pico_llama(out_dir: Path, *, context: int = 256, seed: int = 0, layers: int = 2, hidden: int = 64) -> Path:
    tokenizer = train_bpe_tokenizer(pydoc_topics()[:30], vocab_size=384, max_length=context)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=context,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
                         initializer_range=0.2)  # wide init: peaked logits, so argmax has no near-ties
    torch.manual_seed(seed)
    return save_pico(LlamaForCausalLM(config).eval(), tokenizer, out_dir)


def save_pico(model, tokenizer, out_dir: Path) -> Path:
    """A servable directory: weights, tokenizer and a generation config with the EOS id."""
    config = model.config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                     pad_token_id=config.pad_token_id).save_pretrained(out_dir)
    return out_dir


# family -> (config class, family-specific settings); sliding windows are small so tests cross them
FAMILIES = {
    "llama": ("LlamaConfig", dict(num_key_value_heads=2)),
    "mistral": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=16)),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2)),
    "qwen3": ("Qwen3Config", dict(num_key_value_heads=2, head_dim=16)),
    "gemma2": ("Gemma2Config", dict(num_key_value_heads=2, head_dim=16, sliding_window=16)),
    "gemma3_text": ("Gemma3TextConfig", dict(num_key_value_heads=2, head_dim=16, sliding_window=16)),
    "phi3": ("Phi3Config", dict(num_key_value_heads=2)),
    "gpt2": ("GPT2Config", dict(n_embd=64, n_head=4, n_positions=256)),
    "gpt_neox": ("GPTNeoXConfig", dict()),
    "opt": ("OPTConfig", dict(ffn_dim=128, word_embed_proj_dim=64)),
}


def pico_family_model(family: str, tokenizer, layers: int, seed: int = 0, **overrides):
    """A random-weight pico causal LM of a family, with the pico tokenizer's special tokens; `overrides` replace
    config values (e.g. a larger hidden size for vLLM, whose CPU attention needs head_dim >= 32)."""
    import transformers
    from transformers import AutoModelForCausalLM

    config_name, extra = FAMILIES[family]
    if family == "gemma3_text":  # a sliding/full pattern that pruning must keep attached to the right layers
        extra = {**extra, "layer_types": (["sliding_attention", "full_attention"] * layers)[:layers]}
    if family == "gpt2":
        extra = {**extra, "n_layer": layers}
    settings = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                    num_attention_heads=4, max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                    initializer_range=0.2)  # wide init: peaked logits, so argmax has no near-ties
    config = getattr(transformers, config_name)(**{**settings, **extra, **overrides})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def build_pico_bert(out_dir: Path, sentences: list[str], *, layers: int = 4, seed: int = 0) -> Path:
    """A random BERT encoder (wide init: every layer matters) with a word-level WordPiece vocabulary of the
    sentences, saved as an ordinary HF directory (BertModel + tokenizer)."""
    import re

    import transformers

    words = sorted({w for s in sentences for w in re.findall(r"\w+|[^\w\s]", s.lower())})
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = transformers.BertTokenizerFast(vocab={t: i for i, t in enumerate(specials + words)})
    config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=layers,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                                     initializer_range=0.2)
    torch.manual_seed(seed)
    transformers.BertModel(config).eval().save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir

