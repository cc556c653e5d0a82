"""Pure token-selection functions. Shapes: B = batch rows, V = vocabulary.

Order of operations (as in transformers' generate): temperature, then top-k, then top-p, then one draw from the
row's own generator. Each row draws exactly one random number per step from its own `torch.Generator`, so a seeded
request's draws do not depend on its batch partners.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from prunefusion.server.engines.base import SamplingParams


def filter_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                  top_p: torch.Tensor) -> torch.Tensor:
    """Scale and mask logits for sampling.

    logits [B, V] float; temperature [B] (> 0); top_k [B] long (0 = off); top_p [B] in (0, 1] (1 = off).
    Returns [B, V] float32 with removed tokens at -inf. The most likely token is never removed.
    """
    scaled = logits.float() / temperature[:, None]
    if bool((top_k == 0).all()) and bool((top_p >= 1).all()):
        return scaled  # no filter asked for: skip the vocabulary sort
    sorted_logits, sorted_idx = torch.sort(scaled, dim=-1, descending=True)  # [B, V]
    ranks = torch.arange(scaled.shape[-1], device=scaled.device)[None, :]  # [1, V]
    k = torch.where(top_k > 0, top_k, scaled.shape[-1])[:, None]
    remove_sorted = ranks >= k  # top-k: keep ranks 0..k-1
    probs = torch.softmax(sorted_logits.masked_fill(remove_sorted, float("-inf")), dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # probability of strictly more likely tokens
    # top-p: keep while the mass before is below top_p; top_p == 1 is "off" (float sums may reach 1 early)
    remove_sorted |= (mass_before >= top_p[:, None]) & (top_p[:, None] < 1)
    remove_sorted[:, 0] = False
    remove = torch.zeros_like(remove_sorted).scatter(-1, sorted_idx, remove_sorted)
    return scaled.masked_fill(remove, float("-inf"))


def select_tokens(logits: torch.Tensor, params: Sequence[SamplingParams],
                  generators: Sequence[torch.Generator]) -> list[int]:
    """Pick the next token of every row. logits [B, V]; params and generators have length B."""
    chosen = torch.argmax(logits, dim=-1).tolist()  # greedy rows are done here
    sampled_rows = [i for i, p in enumerate(params) if not p.greedy]
    if not sampled_rows:
        return chosen
    rows = torch.tensor(sampled_rows, device=logits.device)
    filtered = filter_logits(
        logits[rows],
        torch.tensor([params[i].temperature for i in sampled_rows], device=logits.device),
        torch.tensor([params[i].top_k for i in sampled_rows], device=logits.device),
        torch.tensor([params[i].top_p for i in sampled_rows], device=logits.device),
    )
    probs = torch.softmax(filtered, dim=-1).cpu()
    for j, i in enumerate(sampled_rows):
        chosen[i] = int(torch.multinomial(probs[j], 1, generator=generators[i]).item())
    return chosen
