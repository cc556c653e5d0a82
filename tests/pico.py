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
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                     pad_token_id=config.pad_token_id).save_pretrained(out_dir)
    return out_dir
