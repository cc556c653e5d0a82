"""The torch engine serves any HF causal-LM family: batched greedy output equals transformers' generate."""

from __future__ import annotations

import asyncio

import pytest
import torch
from pico import FAMILIES, pico_family_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from prunefusion.server.config import TorchModelConfig
from prunefusion.server.engines.base import GenerationRequest, SamplingParams, collect
from prunefusion.server.engines.torch_engine import TorchEngine

PROMPTS = ["The os module", "x", "Lists are mutable sequences, typically used to store collections of items"]


@pytest.fixture(scope="module")
def tokenizer(pico_dir):
    return AutoTokenizer.from_pretrained(pico_dir)


# the families (and pico configs) that decode on KV slots; every other one stays on transformers' forward
SLOT_FAMILIES = {"llama", "qwen2", "qwen3"}  # pico mistral has sliding_window 16 < its context: transformers


@pytest.mark.parametrize("fast_decode", [True, False], ids=["fast", "plain"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
async def test_family_batched_greedy_equals_generate(family, fast_decode, tokenizer, tmp_path):
    model = pico_family_model(family, tokenizer, layers=3)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    expected = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=40, do_sample=False, eos_token_id=None, pad_token_id=0)
        expected.append(out[0, ids.shape[1]:].tolist())

    engine = TorchEngine(TorchModelConfig(name=family, path=str(tmp_path), max_batch_size=4, fast_decode=fast_decode))
    await engine.start()
    try:
        # no EOS in the engine either: the comparison covers all 40 positions, past the sliding windows
        engine._loaded.eos_token_ids = frozenset()
        results = await asyncio.gather(*(collect(engine.generate(
            GenerationRequest(f"r{i}", p, SamplingParams(max_new_tokens=40)))) for i, p in enumerate(PROMPTS)))
    finally:
        await engine.shutdown()
    assert engine.info.family == family
    assert engine.decode_path == ("slots" if fast_decode and family in SLOT_FAMILIES else "transformers")
    assert engine.peak_batch == len(PROMPTS)
    for result, reference in zip(results, expected, strict=True):
        assert list(result.token_ids) == reference
