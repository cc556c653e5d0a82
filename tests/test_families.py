"""The torch engine serves any HF causal-LM family: batched greedy output equals transformers' generate."""

from __future__ import annotations

import asyncio

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from prunefusion.server.engines.base import GenerationRequest, SamplingParams, collect
from prunefusion.server.engines.torch_engine import TorchEngine, TorchEngineOptions

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              max_position_embeddings=256)
# family -> (config class, extra config); sliding windows are small so the tests cross them
FAMILIES = {
    "llama": ("LlamaConfig", dict(num_key_value_heads=2)),
    "mistral": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=16)),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2)),
    "qwen3": ("Qwen3Config", dict(num_key_value_heads=2, head_dim=16)),
    "gemma2": ("Gemma2Config", dict(num_key_value_heads=2, head_dim=16, sliding_window=16)),
    "gemma3_text": ("Gemma3TextConfig", dict(num_key_value_heads=2, head_dim=16, sliding_window=16,
                                        layer_types=["sliding_attention", "sliding_attention", "full_attention"])),
    "phi3": ("Phi3Config", dict(num_key_value_heads=2)),
    "gpt2": ("GPT2Config", dict(n_embd=64, n_layer=3, n_head=4, n_positions=256)),
    "gpt_neox": ("GPTNeoXConfig", dict()),
    "opt": ("OPTConfig", dict(ffn_dim=128, word_embed_proj_dim=64)),
}
PROMPTS = ["The os module", "x", "Lists are mutable sequences, typically used to store collections of items"]


@pytest.fixture(scope="module")
def tokenizer(pico_dir):
    return AutoTokenizer.from_pretrained(pico_dir)


@pytest.mark.parametrize("family", sorted(FAMILIES))
async def test_family_batched_greedy_equals_generate(family, tokenizer, tmp_path):
    config_name, extra = FAMILIES[family]
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    config = getattr(transformers, config_name)(vocab_size=len(tokenizer), **COMMON, **extra, **special,
                                                initializer_range=0.2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    expected = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=40, do_sample=False, eos_token_id=None, pad_token_id=0)
        expected.append(out[0, ids.shape[1]:].tolist())

    engine = TorchEngine(family, TorchEngineOptions(path=str(tmp_path), max_batch_size=4))
    await engine.start()
    try:
        # no EOS in the engine either: the comparison covers all 40 positions, past the sliding windows
        engine._loaded.eos_token_ids = frozenset()
        results = await asyncio.gather(*(collect(engine.generate(
            GenerationRequest(f"r{i}", p, SamplingParams(max_new_tokens=40)))) for i, p in enumerate(PROMPTS)))
    finally:
        await engine.shutdown()
    assert engine.info.family == family
    assert engine.peak_batch == len(PROMPTS)
    for result, reference in zip(results, expected, strict=True):
        assert list(result.token_ids) == reference
