"""Pure token-selection functions. Shapes: B = batch rows, V = vocabulary.

Order of operations: penalties and the min_new_tokens EOS mask (`apply_penalties`, in vLLM's order: repetition,
then frequency and presence), then (as in transformers' generate) temperature, top-k, top-p, then one draw from
the row's own generator. Log-probabilities (`token_logprobs`) are of the raw logits, before any of these.
Each row draws exactly one random number per step from its own `torch.Generator`, so a seeded request's draws do
not depend on its batch partners.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

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


def apply_penalties(logits: torch.Tensor, params: Sequence[SamplingParams],
                    histories: Sequence[tuple[Sequence[int], Sequence[int]]],
                    eos_ids: Collection[int]) -> torch.Tensor:
    """logits [B, V] with each row's penalties applied; `histories` holds each row's (prompt ids, output ids).

    repetition_penalty r (every token seen in the prompt or the output): a positive logit becomes logit / r, a
    negative one logit * r. frequency f and presence p (the output's tokens): logit - f * count - p * [count > 0].
    Rows with fewer than min_new_tokens outputs get EOS at -inf. Rows that ask for none of it are left as they are;
    with no such row at all, `logits` itself is returned."""
    rows = [i for i, p in enumerate(params)
            if p.penalized or (eos_ids and len(histories[i][1]) < p.min_new_tokens)]
    if not rows:
        return logits
    out = logits.float().clone()
    vocabulary = out.shape[-1]
    for i in rows:
        p, (prompt, output) = params[i], histories[i]
        row = out[i]
        if p.repetition_penalty != 1:
            seen = torch.zeros(vocabulary, dtype=torch.bool, device=out.device)
            seen[torch.tensor([t for t in (*prompt, *output) if t < vocabulary], dtype=torch.long,
                              device=out.device)] = True
            row = torch.where(seen & (row > 0), row / p.repetition_penalty,
                              torch.where(seen, row * p.repetition_penalty, row))
        if p.frequency_penalty or p.presence_penalty:
            counts = torch.bincount(torch.tensor(list(output), dtype=torch.long, device=out.device),
                                    minlength=vocabulary)[:vocabulary].to(row.dtype)
            row = row - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).to(row.dtype)
        if len(output) < p.min_new_tokens:
            row = row.index_fill(0, torch.tensor(sorted(eos_ids), dtype=torch.long, device=out.device),
                                 float("-inf"))
        out[i] = row
    return out


def token_logprobs(logits: torch.Tensor, chosen: Sequence[int],
                   top_n: Sequence[int | None]) -> list[tuple[float, list[tuple[int, float]]] | None]:
    """Per row: (log-probability of the chosen token, the top_n most likely (id, logprob), most likely first), or
    None for rows that asked for no logprobs (top_n None). log_softmax of the raw logits [B, V]."""
    out: list[tuple[float, list[tuple[int, float]]] | None] = [None] * len(chosen)
    rows = [i for i, n in enumerate(top_n) if n is not None]
    if not rows:
        return out
    logp = torch.log_softmax(logits[torch.tensor(rows, device=logits.device)].float(), dim=-1).cpu()
    for j, i in enumerate(rows):
        values, ids = torch.topk(logp[j], top_n[i]) if top_n[i] else (torch.empty(0), torch.empty(0))
        out[i] = (float(logp[j, chosen[i]]), [(int(t), float(v)) for t, v in zip(ids, values, strict=True)])
    return out
