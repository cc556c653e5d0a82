"""Which block to remove: a table of strategies, each (distance table, n, L, seed) -> 0-based start of
[start, start + n).

The n-layer block never contains the final layer, so the last candidate start is L - n - 1.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from prunefusion.compression.angular import best_block
from prunefusion.compression.measure import DistanceTable


def angular(table: DistanceTable, n: int, num_layers: int, seed: int = 0) -> int:
    """Gromov et al.: the block whose input and output are closest in angle (last token)."""
    return best_block(table.last_token, n)[0]


def angular_all_tokens(table: DistanceTable, n: int, num_layers: int, seed: int = 0) -> int:
    """The same, with the distance averaged over every real token: for encoders, whose last token is a [SEP]
    marker rather than the summary of the text (for all-MiniLM-L6-v2 the last-token choice is the worst block)."""
    return best_block(table.all_tokens, n)[0]


def simple(table: DistanceTable | None, n: int, num_layers: int, seed: int = 0) -> int:
    """The n deepest blocks before the final one: [L - n - 1, L - 1). Needs no measurement."""
    return num_layers - n - 1


def block_influence(table: DistanceTable, n: int, num_layers: int, seed: int = 0) -> int:
    """ShortGPT's Block Influence, made contiguous: the block with the lowest summed BI (final layer excluded)."""
    bi = table.block_influence
    return min(range(num_layers - n), key=lambda s: sum(bi[s:s + n]))


def random_block(table: DistanceTable | None, n: int, num_layers: int, seed: int = 0) -> int:
    """A baseline: a block drawn uniformly (by `seed`) among those that keep the final layer."""
    return random.Random(seed).randrange(num_layers - n)


@dataclass(frozen=True)
class Strategy:
    choose: Callable[[DistanceTable | None, int, int, int], int]
    needs_table: bool  # reads the distance table of `compress measure`


STRATEGIES: dict[str, Strategy] = {
    "angular": Strategy(angular, needs_table=True),
    "angular-all-tokens": Strategy(angular_all_tokens, needs_table=True),
    "simple": Strategy(simple, needs_table=False),
    "block-influence": Strategy(block_influence, needs_table=True),
    "random": Strategy(random_block, needs_table=False),
}
NEEDS_TABLE = frozenset(name for name, strategy in STRATEGIES.items() if strategy.needs_table)


def block_size(num_layers: int, n: int | None, fraction: float | None) -> int:
    if (n is None) == (fraction is None):
        raise ValueError("give exactly one of n or fraction")
    size = n if n is not None else round(fraction * num_layers)
    if not 1 <= size <= num_layers - 2:
        raise ValueError(f"a block of {size} layers cannot be removed from {num_layers} (keep the first and last)")
    return size
