"""The vectorised sampler against a slow, obvious per-row reference."""

import math

import pytest
import torch

from prunefusion.server.engines.base import SamplingParams
from prunefusion.server.engines.sampling import filter_logits, select_tokens


def reference_keep_set(logits: list[float], temperature: float, top_k: int, top_p: float) -> set[int]:
    """Token ids that survive temperature -> top-k -> top-p, computed one row at a time in plain Python."""
    scaled = [x / temperature for x in logits]
    order = sorted(range(len(scaled)), key=lambda i: -scaled[i])
    if top_k > 0:
        order = order[:top_k]
    z = max(scaled[i] for i in order)
    weights = [math.exp(scaled[i] - z) for i in order]
    total = sum(weights)
    kept, mass = [], 0.0
    for i, w in zip(order, weights, strict=True):
        if kept and top_p < 1 and mass >= top_p:
            break
        kept.append(i)
        mass += w / total
    return set(kept)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.5), (0.5, 20, 0.9),
                                                     (2.0, 1, 1.0), (1.0, 0, 1e-6)])
def test_filter_matches_reference(temperature, top_k, top_p):
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    out = filter_logits(logits, torch.full((4,), temperature), torch.full((4,), top_k), torch.full((4,), top_p))
    for row in range(4):
        kept = {i for i in range(50) if math.isfinite(out[row, i])}
        assert kept == reference_keep_set(logits[row].tolist(), temperature, top_k, top_p)
        for i in kept:
            assert out[row, i].item() == pytest.approx(logits[row, i].item() / temperature, rel=1e-6)


def test_rows_use_their_own_parameters():
    torch.manual_seed(1)
    logits = torch.randn(3, 30)
    params = [(1.0, 3, 1.0), (1.0, 0, 0.3), (0.5, 0, 1.0)]
    out = filter_logits(logits, torch.tensor([p[0] for p in params]), torch.tensor([p[1] for p in params]),
                        torch.tensor([p[2] for p in params]))
    for row, (t, k, p) in enumerate(params):
        kept = {i for i in range(30) if math.isfinite(out[row, i])}
        assert kept == reference_keep_set(logits[row].tolist(), t, k, p)


def test_greedy_rows_take_argmax_and_draw_nothing():
    logits = torch.randn(2, 10)
    generator = torch.Generator().manual_seed(5)
    state = generator.get_state()
    tokens = select_tokens(logits, [SamplingParams(5), SamplingParams(5)], [generator, generator])
    assert tokens == logits.argmax(-1).tolist()
    assert torch.equal(generator.get_state(), state)


def test_seeded_draws_do_not_depend_on_batch_partners():
    torch.manual_seed(2)
    logits = torch.randn(3, 100)
    sampled = SamplingParams(5, temperature=1.0, top_p=0.95)
    alone = select_tokens(logits[1:2], [sampled], [torch.Generator().manual_seed(11)])
    together = select_tokens(logits, [SamplingParams(5, temperature=0.8), sampled, SamplingParams(5)],
                             [torch.Generator().manual_seed(99), torch.Generator().manual_seed(11),
                              torch.Generator().manual_seed(0)])
    assert together[1] == alone[0]


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    generator = torch.Generator().manual_seed(0)
    counts = [0, 0, 0]
    for _ in range(3000):
        counts[select_tokens(logits, [SamplingParams(1, temperature=1.0)], [generator])[0]] += 1
    assert counts[0] / 3000 == pytest.approx(0.7, abs=0.03)
    assert counts[2] / 3000 == pytest.approx(0.1, abs=0.02)
