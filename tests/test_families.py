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


def generate_references(family: str, tokenizer, directory, prompts: list[str], tokens: int) -> list[list[int]]:
    """Save a pico `family` model to `directory` (what the engine will load) and return transformers' greedy
    `generate` continuation of each prompt from the reloaded copy, `tokens` long, EOS ignored."""
    model = pico_family_model(family, tokenizer, layers=3)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    expected = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
        expected.append(out[0, ids.shape[1]:].tolist())
    return expected


async def served_together(engine: TorchEngine, prompts: list[str], tokens: int) -> list:
    """Start the engine, send every prompt at once (greedy, `tokens` long, EOS ignored), shut it down; the results
    in prompt order."""
    await engine.start()
    try:
        return await asyncio.gather(*(collect(engine.generate(GenerationRequest(
            f"r{i}", p, SamplingParams(max_new_tokens=tokens, ignore_eos=True)))) for i, p in enumerate(prompts)))
    finally:
        await engine.shutdown()


@pytest.mark.parametrize("fast_decode", [True, False], ids=["fast", "plain"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
async def test_family_batched_greedy_equals_generate(family, fast_decode, tokenizer, tmp_path):
    expected = generate_references(family, tokenizer, tmp_path, PROMPTS, 40)

    engine = TorchEngine(TorchModelConfig(name=family, path=str(tmp_path), max_batch_size=4, fast_decode=fast_decode))
    # no EOS in the engine either: the comparison covers all 40 positions, past the sliding windows
    results = await served_together(engine, PROMPTS, 40)
    assert engine.info.family == family
    assert engine.decode_path == ("slots" if fast_decode and family in SLOT_FAMILIES else "transformers")
    assert engine.peak_batch == len(PROMPTS)
    for result, reference in zip(results, expected, strict=True):
        assert list(result.token_ids) == reference


SHARED = " ".join(["The os module provides a portable way of using operating system dependent functionality."] * 3)


@pytest.mark.parametrize("family", sorted(SLOT_FAMILIES))
async def test_chunked_prefill_and_prefix_hits_keep_greedy_equal_to_generate(family, tokenizer, tmp_path):
    """Prompts prefilled 7 tokens per step between decode steps, three of them starting from blocks another prompt
    left in the prefix cache: every output equals generate's."""
    prompts = [SHARED + " Lists", SHARED + " Tuples are immutable", "x", SHARED]
    expected = generate_references(family, tokenizer, tmp_path, prompts, 30)
    shared_blocks = len(tokenizer(SHARED).input_ids) // 32
    assert shared_blocks >= 2

    engine = TorchEngine(TorchModelConfig(name=family, path=str(tmp_path), max_batch_size=4, prefill_chunk_tokens=7,
                                          prefix_cache_tokens=1024))
    await engine.start()
    try:
        def run(i: int):
            return collect(engine.generate(GenerationRequest(f"r{i}", prompts[i],
                                                             SamplingParams(max_new_tokens=30, ignore_eos=True))))

        first = await run(0)  # alone: a miss, and its blocks stay in the cache
        assert engine.prefix_cache.hit_tokens == 0
        assert engine.prefill_passes == -(-len(tokenizer(prompts[0]).input_ids) // 7)  # in chunks of 7
        rest = await asyncio.gather(*(run(i) for i in range(1, 4)))
    finally:
        await engine.shutdown()
    assert engine.peak_batch == 3
    assert engine.prefix_cache.hit_tokens >= 2 * shared_blocks * 32  # prompts 1 and 3 start with the shared blocks
    for result, reference in zip([first, *rest], expected, strict=True):
        assert list(result.token_ids) == reference


@pytest.mark.parametrize("family", ["llama", pytest.param("qwen3", marks=pytest.mark.slow)])  # qwen3: q/k norms
async def test_the_compiled_decode_step_keeps_greedy_equal_to_generate(family, tokenizer, tmp_path):
    """compile_decode: the decode steps run through torch.compile's graph (dynamic shapes: rows join one by one,
    the window grows past 64 columns), and every output still equals generate's."""
    prompts = [SHARED, "x", PROMPTS[2]]
    expected = generate_references(family, tokenizer, tmp_path, prompts, 40)
    engine = TorchEngine(TorchModelConfig(name=family, path=str(tmp_path), max_batch_size=4, compile_decode=True))
    results = await served_together(engine, prompts, 40)
    assert engine.compile_seconds > 0 and engine._kv.compiled_passes >= 39
    for result, reference in zip(results, expected, strict=True):
        assert list(result.token_ids) == reference
