"""Batch methods: they judge each document against the other documents of its batch (one gRPC request, or one
`score_batch` call), unlike the Sharma score and the rule filters, which look at one document at a time.

- `semdedup`: near-duplicates by MiniLM embeddings (SemDeDup; reason `semdedup_duplicate`; the kept document of the
  group is named in `duplicate_of`), keeping in each duplicate group the document farthest from its cluster centroid;
- `long_file`: the longest `drop_top_percent` of the batch by characters (reason `long_file`; the code heuristic);
- `outlier`: SCIP-style distance to the document's cluster centroid, as the signal `centroid_distance`; with
  `drop_top_percent` > 0 the most distant documents get the reason `centroid_outlier`.

Each method is a frozen dataclass whose fields are its thresholds (`"semdedup.eps"` in a request), like the rule
filters, and whose `apply` returns one `Verdict` per document. The embeddings are computed at most once per batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from prunefusion.quality import semdedup as sd

Embed = Callable[[], np.ndarray]  # the batch's embeddings [N, d], computed on first call


@dataclass
class Verdict:
    reasons: list[str] = field(default_factory=list)
    signals: dict[str, float] = field(default_factory=dict)
    duplicate_of: int | None = None  # index of the kept document this one duplicates


def _check_percent(name: str, value: float) -> None:
    if not 0 <= value <= 100:
        raise ValueError(f"{name} must be in [0, 100], got {value}")


def _top_mask(values: np.ndarray, percent: float) -> np.ndarray:
    """True for the floor(N * percent / 100) largest values (ties: the later item first)."""
    return ~sd.long_file_mask(values, percent)


@dataclass(frozen=True)
class SemDedup:
    eps: float = 0.01  # cosine distance: duplicates have cosine > 1 - eps
    clusters: int = 0  # k-means clusters; 0: semdedup.default_k(N)

    REASON_CODES: ClassVar[tuple[str, ...]] = ("semdedup_duplicate",)
    NEEDS_EMBEDDINGS: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not 0 <= self.eps <= 2:
            raise ValueError(f"semdedup.eps is a cosine distance in [0, 2], got {self.eps}")

    def apply(self, texts: list[str], embed: Embed) -> list[Verdict]:
        k = min(self.clusters, len(texts)) if self.clusters else None
        result = sd.semdedup(embed(), eps=self.eps, k=k)
        return [Verdict(duplicate_of=None if keep else int(dup), reasons=[] if keep else ["semdedup_duplicate"])
                for keep, dup in zip(result.keep, result.duplicate_of, strict=True)]


@dataclass(frozen=True)
class LongFile:
    drop_top_percent: float = 2.0

    REASON_CODES: ClassVar[tuple[str, ...]] = ("long_file",)
    NEEDS_EMBEDDINGS: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _check_percent("long_file.drop_top_percent", self.drop_top_percent)

    def apply(self, texts: list[str], embed: Embed) -> list[Verdict]:
        longest = _top_mask(np.array([len(t) for t in texts]), self.drop_top_percent)
        return [Verdict(reasons=["long_file"] if drop else []) for drop in longest]


@dataclass(frozen=True)
class Outlier:
    drop_top_percent: float = 0.0  # 0: annotate only
    clusters: int = 0  # 0: semdedup.default_k(N)

    REASON_CODES: ClassVar[tuple[str, ...]] = ("centroid_outlier",)
    NEEDS_EMBEDDINGS: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _check_percent("outlier.drop_top_percent", self.drop_top_percent)

    def apply(self, texts: list[str], embed: Embed) -> list[Verdict]:
        x = embed()
        k = min(self.clusters, len(texts)) if self.clusters else sd.default_k(len(texts))
        centroids, labels = sd.spherical_kmeans(x, k)
        distance = sd.centroid_outlier_scores(x, centroids, labels)
        outlying = _top_mask(distance, self.drop_top_percent)
        return [Verdict(reasons=["centroid_outlier"] if drop else [], signals={"centroid_distance": float(d)})
                for d, drop in zip(distance, outlying, strict=True)]


BatchMethod = SemDedup | LongFile | Outlier
BATCH_METHODS: dict[str, type] = {"semdedup": SemDedup, "long_file": LongFile, "outlier": Outlier}


def needs_embeddings(methods: list[BatchMethod]) -> bool:
    return any(m.NEEDS_EMBEDDINGS for m in methods)


def apply_batch_methods(texts: list[str], methods: list[BatchMethod], embed: Embed) -> list[Verdict]:
    """Every method's verdicts merged per document (reasons in method order), embedding the batch at most once."""
    cached: list[np.ndarray] = []

    def embed_once() -> np.ndarray:
        if not cached:
            cached.append(embed())
        return cached[0]

    merged = [Verdict() for _ in texts]
    if not texts:
        return merged
    for method in methods:
        for total, verdict in zip(merged, method.apply(texts, embed_once), strict=True):
            total.reasons += verdict.reasons
            total.signals.update(verdict.signals)
            if verdict.duplicate_of is not None:
                total.duplicate_of = verdict.duplicate_of
    return merged


def batch_reason_codes() -> list[str]:
    return [code for cls in BATCH_METHODS.values() for code in cls.REASON_CODES]

