"""The left-padded batch cache gives every row the logits it would get alone."""

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from prunefusion.server.engines.kv_batch import BatchedKV


def test_batched_decode_equals_single_row_decode(pico_dir):
    model = AutoModelForCausalLM.from_pretrained(pico_dir).eval()
    prompts = [[1, 50, 60, 70, 80, 90], [1, 33], [1, 7, 8, 9]]
    nxt = [11, 12, 13]
    singles = []
    batch = BatchedKV()
    with torch.no_grad():
        for p, n in zip(prompts, nxt, strict=True):
            full = model(input_ids=torch.tensor([p + [n]])).logits[0, -1]
            singles.append(full)
            cache = DynamicCache()
            model(input_ids=torch.tensor([p]), past_key_values=cache, use_cache=True)
            batch.join(cache, len(p))
        assert batch.mask.tolist() == [[1] * 6, [0] * 4 + [1] * 2, [0] * 2 + [1] * 4]
        assert batch.next_positions().flatten().tolist() == [6, 2, 4]
        mask = batch.decode_mask()
        logits = model(input_ids=torch.tensor([[n] for n in nxt]), attention_mask=mask,
                       position_ids=batch.next_positions(), past_key_values=batch.cache, use_cache=True).logits
        batch.after_decode(mask)
    for row in range(3):
        torch.testing.assert_close(logits[row, -1], singles[row], rtol=1e-4, atol=1e-4)
    # the longest row leaves: the padding column prefix nobody needs is trimmed
    batch.keep([1, 2])
    assert batch.width == 5
    assert batch.mask.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert batch.cache.layers[0].keys.shape[0] == 2 and batch.cache.layers[0].keys.shape[2] == 5
    batch.keep([])
    assert batch.size == 0
