"""The slot KV cache gives every row the logits it would get alone, as rows join and leave between steps."""

import pytest
import torch
from pico import pico_family_model
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from prunefusion.server.engines.slot_kv import FAST_FAMILIES, SlotKV, refusal


def alone(model, tokens: list[int]) -> torch.Tensor:
    """The reference: one plain forward over the row's whole sequence, no cache."""
    return model(input_ids=torch.tensor([tokens])).logits[0, -1]


def join(model, slots: SlotKV, prompt: list[int]) -> None:
    cache = DynamicCache()
    model(input_ids=torch.tensor([prompt]), past_key_values=cache, use_cache=True)
    slots.join(cache, len(prompt))


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_rows_joining_and_leaving_decode_as_if_alone(family, pico_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(pico_dir)
    model = pico_family_model(family, tokenizer, layers=3) if family != "llama" else \
        AutoModelForCausalLM.from_pretrained(pico_dir).eval()
    sequences = [[1, 50, 60, 70, 80, 90], [1, 33], [1, 7, 8, 9]]
    slots = SlotKV(model, rows=4, context_length=128)
    with torch.no_grad():
        for prompt in sequences:
            join(model, slots, prompt)

        def step(rows: list[list[int]], new: list[int]) -> None:
            logits = slots.decode_logits(model, torch.tensor([[t] for t in new]))
            for row, token in zip(rows, new, strict=True):
                row.append(token)
            for i, row in enumerate(rows):
                torch.testing.assert_close(logits[i], alone(model, row), rtol=1e-4, atol=1e-4)

        step(sequences, [11, 12, 13])
        step(sequences, [21, 22, 23])
        assert slots.lengths == [8, 4, 6]
        slots.keep([0, 2])  # the middle row leaves: the last one moves down into its slot
        sequences = [sequences[0], sequences[2]]
        assert slots.lengths == [8, 6]
        join(model, slots, [1, 5, 5, 5, 5, 5, 5, 5, 5, 5])  # a newcomer longer than every row so far
        sequences.append([1, 5, 5, 5, 5, 5, 5, 5, 5, 5])
        for new in ([31, 32, 33], [41, 42, 43]):
            step(sequences, new)
        slots.keep([])
        assert slots.size == 0


def test_the_slot_cache_is_allocated_once_at_its_full_size(pico_dir):
    model = AutoModelForCausalLM.from_pretrained(pico_dir).eval()
    cfg = model.config
    slots = SlotKV(model, rows=4, context_length=100)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    assert slots.keys.shape == (cfg.num_hidden_layers, 4, cfg.num_key_value_heads, 100, head_dim)
    assert slots.nbytes == 2 * slots.keys.numel() * slots.keys.element_size()


def test_families_without_a_slot_step_are_refused_with_the_reason(pico_dir):
    tokenizer = AutoTokenizer.from_pretrained(pico_dir)
    assert refusal(pico_family_model("llama", tokenizer, layers=2), 256) is None
    assert "gpt2" in refusal(pico_family_model("gpt2", tokenizer, layers=2), 256)
    assert "phi3" in refusal(pico_family_model("phi3", tokenizer, layers=2), 256)
    # a sliding window shorter than the context needs the window mask the slot step does not apply
    assert "sliding_window 16" in refusal(pico_family_model("mistral", tokenizer, layers=2), 256)
    assert refusal(pico_family_model("mistral", tokenizer, layers=2, sliding_window=None), 256) is None
    assert set(FAST_FAMILIES) == {"llama", "mistral", "qwen2", "qwen3"}


def prefill_in_chunks(model, slots: SlotKV, prompt: list[int], chunk: int, prefix=()) -> torch.Tensor:
    """Stage a row (after `prefix` blocks) and extend it `chunk` tokens at a time; the last chunk's logits."""
    slots.stage(list(prefix))
    while slots.staged < len(prompt):
        start = slots.staged
        logits = slots.extend_logits(model, torch.tensor([prompt[start:start + chunk]]))
    return logits[0]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_a_prompt_prefilled_in_chunks_beside_or_with_decoding_rows_gets_the_logits_it_gets_alone(family, pico_dir):
    tokenizer = AutoTokenizer.from_pretrained(pico_dir)
    model = pico_family_model(family, tokenizer, layers=3) if family != "llama" else \
        AutoModelForCausalLM.from_pretrained(pico_dir).eval()
    slots = SlotKV(model, rows=4, context_length=256)
    rows = [[1, 50, 60, 70], [1, 33, 34], [1, 9]]
    long = [1] + [(7 * i) % 200 + 3 for i in range(150)]  # crosses the 64-column window steps
    with torch.no_grad():
        for prompt in rows:
            join(model, slots, prompt)
        slots.stage()
        for step, start in enumerate(range(0, len(long), 40)):  # a chunk of the long prompt with each decode step
            decode_ids, chunk_ids = torch.tensor([[20 + step]] * len(rows)), torch.tensor([long[start:start + 40]])
            if step % 2:  # one forward pass over both (a mixed batch)
                logits, last = slots.decode_and_extend_logits(model, decode_ids, chunk_ids)
            else:
                logits, last = slots.decode_logits(model, decode_ids), slots.extend_logits(model, chunk_ids)
            for i, row in enumerate(rows):
                row.append(20 + step)
                torch.testing.assert_close(logits[i], alone(model, row), rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(last[0], alone(model, long[:start + 40]), rtol=1e-4, atol=1e-4)
            if step == 1:  # the middle row leaves while the long prompt is half prefilled: the staged slot moves
                slots.keep([0, 2])
                rows = [rows[0], rows[2]]
        slots.commit()
        rows.append(long)
        assert slots.lengths == [len(r) for r in rows]
        logits = slots.decode_logits(model, torch.tensor([[5]] * 3))
        for i, row in enumerate(rows):
            row.append(5)
            torch.testing.assert_close(logits[i], alone(model, row), rtol=1e-4, atol=1e-4)


def test_a_prompt_staged_from_copied_prefix_blocks_gets_the_logits_it_gets_alone(pico_dir):
    model = AutoModelForCausalLM.from_pretrained(pico_dir).eval()
    slots = SlotKV(model, rows=2, context_length=128)
    shared = [1] + list(range(10, 42))  # 33 tokens: blocks [0, 16) and [16, 32)
    with torch.no_grad():
        prefill_in_chunks(model, slots, shared + [99], chunk=64)
        blocks = [slots.staged_block(0, 16), slots.staged_block(16, 32)]
        slots.unstage()
        other = shared[:32] + [77, 78, 79]
        logits = prefill_in_chunks(model, slots, other, chunk=64, prefix=blocks)
    torch.testing.assert_close(logits, alone(model, other), rtol=1e-4, atol=1e-4)
    assert slots.staged == len(other)


def test_extending_past_the_context_is_refused(pico_dir):
    model = AutoModelForCausalLM.from_pretrained(pico_dir).eval()
    slots = SlotKV(model, rows=1, context_length=8)
    slots.stage()
    with pytest.raises(ValueError, match="context of 8"):
        slots.extend_logits(model, torch.tensor([list(range(1, 10))]))
