"""The prefix cache reuses exactly the blocks of a shared token prefix, never the prompt's last token, within its
bound, dropping the least recently used chains from their tails."""

import torch

from prunefusion.server.engines.prefix_cache import PrefixCache, block_digests


def block(start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A stand-in for a slot's keys and values at [start, end): the positions themselves, so a test can see which
    block came back."""
    positions = torch.arange(start, end, dtype=torch.float32).view(1, 1, -1, 1)
    return positions, -positions


def test_a_block_is_named_by_every_token_before_it():
    a = block_digests(list(range(64)), 32)
    b = block_digests([99] + list(range(1, 64)), 32)  # only the first token differs
    assert len(a) == len(b) == 2 and a[0] != b[0] and a[1] != b[1]
    assert block_digests(list(range(64)), 32) == a
    assert block_digests(list(range(63)), 32) == a[:1]  # a partial block has no name


def test_a_hit_takes_the_shared_full_blocks_and_leaves_the_last_token_to_compute():
    cache = PrefixCache(max_tokens=32 * 8, block_tokens=32)
    shared = list(range(1, 70))  # 69 tokens: two full blocks
    cache.store(shared, block)
    hit = cache.lookup(shared[:64] + [500, 501])
    assert [int(k[0, 0, 0, 0]) for k, _ in hit] == [0, 32]
    assert (cache.hit_tokens, cache.computed_tokens) == (64, 2)
    # a prompt that is exactly the cached blocks: the last block is recomputed, its last token's logits are needed
    assert len(cache.lookup(shared[:64])) == 1
    assert cache.lookup([7] + shared[1:64] + [500]) == []  # a different first token: nothing matches


def test_the_bound_holds_and_the_least_recently_used_chain_loses_its_tail_first():
    cache = PrefixCache(max_tokens=32 * 3, block_tokens=32)
    a, b = list(range(1, 100)), list(range(1000, 1099))  # three full blocks each
    cache.store(a, block)
    cache.store(b, block)  # a is the least recently used now: three of its blocks must go
    assert cache.tokens == 96 and len(cache.lookup(b + [0])) == 3 and cache.lookup(a + [0]) == []
    cache = PrefixCache(max_tokens=32 * 5, block_tokens=32)
    cache.store(a, block)
    cache.store(b, block)  # one block over the bound: a's last block goes, its head still hits
    assert len(cache.lookup(a + [0])) == 2 and len(cache.lookup(b + [0])) == 3
    assert cache.nbytes == 5 * 2 * 32 * 4  # five blocks of keys and values, 32 float32 each


def test_a_zero_bound_stores_nothing():
    cache = PrefixCache(max_tokens=0)
    cache.store(list(range(200)), block)
    assert cache.tokens == 0 and cache.lookup(list(range(200))) == []
