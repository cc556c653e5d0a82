"""Pure math of layer-similarity pruning. Shapes: P = L + 1 recorded positions (layer inputs x^0..x^{L-1} and the
last layer's output x^L before the final norm), B = batch, T = tokens, D = hidden size.

d(x^l, x^{l+n}) = arccos(cos_sim(x^l, x^{l+n})) / pi  (Gromov et al., eq. 7), in [0, 1].
"""

from __future__ import annotations

import math

import torch


def pairwise_angular(states: torch.Tensor) -> torch.Tensor:
    """All position pairs at once. states [P, B, D] -> [B, P, P] with [b, i, j] = d(x^i_b, x^j_b)."""
    unit = torch.nn.functional.normalize(states.double(), dim=-1)
    cos = torch.einsum("ibd,jbd->bij", unit, unit)
    return torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi


def pairwise_angular_tokens(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample mean over real tokens. states [P, B, T, D], mask [B, T] (1 = token) -> [B, P, P]."""
    unit = torch.nn.functional.normalize(states.double(), dim=-1)
    cos = torch.einsum("ibtd,jbtd->btij", unit, unit)  # [B, T, P, P]
    dist = torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi
    weights = mask.double() / mask.double().sum(dim=1, keepdim=True)  # [B, T]
    return torch.einsum("btij,bt->bij", dist, weights)


def block_influence(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ShortGPT's BI_i = 1 - E_t cos(x^i_t, x^{i+1}_t) for every layer i, per sample: [P, B, T, D] -> [B, P - 1]."""
    cos = torch.nn.functional.cosine_similarity(states[:-1].double(), states[1:].double(), dim=-1)  # [P-1, B, T]
    weights = mask.double() / mask.double().sum(dim=1, keepdim=True)
    return 1.0 - torch.einsum("pbt,bt->bp", cos, weights)


def table_from_pairs(pairs: torch.Tensor) -> dict[int, list[float]]:
    """[P, P] mean distances -> {n: [d(l, n) for l in 0..L-n]} for n = 1..L (L = P - 1)."""
    last = pairs.shape[0] - 1
    return {n: [float(pairs[start, start + n]) for start in range(last - n + 1)] for n in range(1, last + 1)}


def best_block(table: dict[int, list[float]], n: int, allow_last: bool = False) -> tuple[int, float]:
    """l*(n) = argmin_l d(l, n), and d*(n). Blocks ending at the final layer (l + n == L) are excluded unless
    allowed: they are nearly maximally dissimilar, and dropping the final layer breaks models (paper, Fig. 1)."""
    row = table[n]
    last = len(row) - 1 + n  # L
    candidates = [(d, start) for start, d in enumerate(row) if allow_last or start + n < last]
    if not candidates:
        raise ValueError(f"no block of {n} layers avoids the final layer; pass allow_last to force it")
    d, start = min(candidates)
    return start, d
