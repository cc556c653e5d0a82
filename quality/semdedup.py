"""Embedding-space data pruning in numpy: SemDeDup, spherical k-means, SCIP-style outlier scores, long-file dropping.

    result = semdedup(embeddings, eps=0.01)      # embeddings [N, d], e.g. default_embedder().embed(texts)
    texts = [t for t, keep in zip(texts, result.keep) if keep]

SemDeDup (Abbas et al. 2023): cluster the L2-normalised embeddings with spherical k-means; within each cluster walk
the items from the farthest from the centroid to the nearest, and drop an item whose cosine similarity to an item
already kept in that cluster exceeds 1 - eps. Each group of near-duplicates thus keeps its member farthest from the
centroid (the least prototypical one). SCIP (code data) prunes items far from their centroid and items in small
clusters: `centroid_outlier_scores` and `small_cluster_flags` give those signals. Long files: the longest few percent
of code files hold a large share of the tokens; `long_file_mask` drops them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Similarities are float32 dot products, good to about 1e-6 (an exact copy's cosine measured up to 1e-6 off 1 at
# d=384; the same text embedded in two different batches ~5e-7 off): a cosine within SIM_ATOL of the threshold counts
# as above it, so eps=0 removes exact duplicates (and copies within float noise of them) and nothing else.
SIM_ATOL = 1e-5
_ASSIGN_ROWS = 16384  # rows per block when assigning points to centroids (bounds the [rows, k] similarity block)
_DEDUP_ROWS = 1024  # rows per block of a cluster's similarity matrix in semdedup


@dataclass(frozen=True)
class SemDedupResult:
    """keep[i]: item i survives; duplicate_of[i]: -1 for a kept item, else the kept item (same cluster) it is most
    similar to; labels[i]: its cluster; centroids: [k, d] unit-norm; k: the number of clusters used."""

    keep: np.ndarray
    duplicate_of: np.ndarray
    labels: np.ndarray
    centroids: np.ndarray
    k: int

    @property
    def removed(self) -> int:
        return int((~self.keep).sum())


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, as float32; an all-zero row stays zero."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D array [N, d], got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1).astype(np.float32)


def _assign(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's most similar centroid (first on ties) and that cosine, in row blocks."""
    labels = np.empty(len(x), dtype=np.int64)
    best = np.empty(len(x), dtype=np.float32)
    for start in range(0, len(x), _ASSIGN_ROWS):
        sims = x[start:start + _ASSIGN_ROWS] @ centroids.T
        labels[start:start + len(sims)] = sims.argmax(axis=1)
        best[start:start + len(sims)] = sims[np.arange(len(sims)), labels[start:start + len(sims)]]
    return labels, best


def _kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding on the sphere: squared chord distance 2 - 2 cos; uniform among unused points once every
    point coincides with a chosen one (fewer distinct points than k)."""
    n = len(x)
    chosen = [int(rng.integers(n))]
    nearest = np.maximum(2.0 - 2.0 * (x @ x[chosen[0]]), 0.0).astype(np.float64)
    for _ in range(1, k):
        total = nearest.sum()
        if total > 0:
            pick = int(rng.choice(n, p=nearest / total))
        else:
            unused = np.setdiff1d(np.arange(n), chosen)
            pick = int(rng.choice(unused))
        chosen.append(pick)
        nearest = np.minimum(nearest, np.maximum(2.0 - 2.0 * (x @ x[pick]), 0.0))
    return x[chosen].copy()


def spherical_kmeans(x: np.ndarray, k: int, *, iters: int = 25, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Cluster rows by cosine similarity: returns (centroids [k, d] unit-norm float32, labels [N] int64).

    Rows are L2-normalised first. k-means++ seeding (numpy Generator `seed`), then up to `iters` rounds of: assign
    each point to its most similar centroid, set each centroid to its members' normalised mean. A cluster left
    empty is re-seeded with the point least similar to its own centroid (one point per empty cluster, farthest
    first). Stops early once the labels stop changing. Deterministic for a seed (on one machine and BLAS).
    """
    return _kmeans_unit(normalize_rows(x), k, iters, seed)


def _kmeans_unit(x: np.ndarray, k: int, iters: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """spherical_kmeans on rows already normalised (normalising twice can move the last bit)."""
    n = len(x)
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, N={n}], got {k}")
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    centroids = _kmeans_pp(x, k, np.random.default_rng(seed))
    labels, _ = _assign(x, centroids)
    for _ in range(iters):
        sums = np.zeros_like(centroids)
        np.add.at(sums, labels, x)
        counts = np.bincount(labels, minlength=k)
        empty = np.flatnonzero(counts == 0)
        if empty.size:
            own = np.einsum("ij,ij->i", x, centroids[labels])
            for cluster, point in zip(empty, np.argsort(own, kind="stable")[:empty.size], strict=True):
                sums[cluster] = x[point]
        centroids = normalize_rows(sums)
        new_labels, _ = _assign(x, centroids)
        if np.array_equal(new_labels, labels) and not empty.size:
            break
        labels = new_labels
    return centroids, labels


def default_k(n: int) -> int:
    """round(sqrt(N / 2)), at least 1 and at most N (0 for no items)."""
    return 0 if n == 0 else max(1, min(n, round(math.sqrt(n / 2))))


def _dedup_sorted(x: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Greedy pass over rows already in walk order (farthest from the centroid first): row i is dropped when its
    cosine to some earlier kept row exceeds `threshold`; it then points at the most similar such row (first on
    ties). Returns (keep [m] bool, duplicate_of [m] positions, -1 for kept rows). The [block, m] similarity block is
    computed at once; only rows with an earlier row over the threshold go through the Python loop."""
    m = len(x)
    keep = np.ones(m, dtype=bool)
    dup = np.full(m, -1, dtype=np.int64)
    for start in range(0, m, _DEDUP_ROWS):
        stop = min(m, start + _DEDUP_ROWS)
        sims = x[start:stop] @ x[:stop].T
        hits = (sims > threshold) & (np.arange(stop)[None, :] < np.arange(start, stop)[:, None])  # earlier rows only
        for row in np.flatnonzero(hits.any(axis=1)):
            i = start + row
            candidates = np.flatnonzero(hits[row, :i] & keep[:i])
            if candidates.size:
                keep[i] = False
                dup[i] = candidates[np.argmax(sims[row, candidates])]
    return keep, dup


def semdedup(embeddings: np.ndarray, *, eps: float = 0.01, k: int | None = None, seed: int = 0,
             iters: int = 25) -> SemDedupResult:
    """SemDeDup: keep mask and duplicate pointers for `embeddings` [N, d] (any scale; rows are L2-normalised).

    Clusters with spherical_kmeans(k, seed, iters) (k default: default_k(N)); within each cluster sorts items by
    cosine distance to the centroid, farthest first (ties: lower index first), and drops an item whose largest
    cosine to an item already kept in the cluster is > 1 - eps (minus SIM_ATOL, see there). Only kept items count:
    an item similar only to a dropped one is kept (the original code compares with every earlier item, kept or not,
    which can also drop chains A~B~C down to A). Typical eps: 0.01 or 0.001 with all-MiniLM-L6-v2.
    """
    if not 0 <= eps <= 2:
        raise ValueError(f"eps is a cosine distance in [0, 2], got {eps}")
    x = normalize_rows(embeddings)
    n = len(x)
    k = default_k(n) if k is None else k
    if n == 0:
        if k:
            raise ValueError(f"k must be 0 for no items, got {k}")
        return SemDedupResult(np.ones(0, bool), np.full(0, -1, np.int64), np.zeros(0, np.int64),
                              np.zeros((0, x.shape[1]), np.float32), 0)
    centroids, labels = _kmeans_unit(x, k, iters, seed)
    keep = np.ones(n, dtype=bool)
    duplicate_of = np.full(n, -1, dtype=np.int64)
    threshold = 1.0 - eps - SIM_ATOL
    order = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    for members in np.split(order, bounds):  # each cluster's indices, ascending
        if len(members) < 2:
            continue
        closeness = x[members] @ centroids[labels[members[0]]]
        walk = members[np.argsort(closeness, kind="stable")]  # farthest (least similar) first
        kept, dup = _dedup_sorted(x[walk], threshold)
        keep[walk] = kept
        duplicate_of[walk[~kept]] = walk[dup[~kept]]
    return SemDedupResult(keep, duplicate_of, labels, centroids, k)


def long_file_mask(lengths: list[int] | np.ndarray, drop_top_percent: float = 2.0) -> np.ndarray:
    """Keep mask dropping the floor(N * drop_top_percent / 100) longest items (lengths in tokens, bytes or lines).
    Ties at the cut are broken by position: among equal lengths the later item is dropped first."""
    lengths = np.asarray(lengths)
    if lengths.ndim != 1:
        raise ValueError(f"lengths must be 1-D, got shape {lengths.shape}")
    if not 0 <= drop_top_percent <= 100:
        raise ValueError(f"drop_top_percent must be in [0, 100], got {drop_top_percent}")
    n = len(lengths)
    n_drop = math.floor(round(n * drop_top_percent / 100, 9))  # round: 0.07 * 100 is 7.000000000000001
    order = np.lexsort((-np.arange(n), -lengths.astype(np.float64)))  # longest first; later index first on ties
    keep = np.ones(n, dtype=bool)
    keep[order[:n_drop]] = False
    return keep


def centroid_outlier_scores(embeddings: np.ndarray, centroids: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """SCIP-style outlier score per item: 1 - cosine(item, its own cluster's centroid), in [0, 2]; higher is more
    outlying. Embeddings and centroids need not be normalised."""
    x, c = normalize_rows(embeddings), normalize_rows(centroids)
    labels = np.asarray(labels)
    if labels.shape != (len(x),):
        raise ValueError(f"labels must have shape ({len(x)},), got {labels.shape}")
    if len(labels) and not (labels.min() >= 0 and labels.max() < len(c)):
        raise ValueError(f"labels must be in [0, {len(c)})")
    return (1.0 - np.einsum("ij,ij->i", x, c[labels])).astype(np.float32)


def small_cluster_flags(labels: np.ndarray, min_size: int) -> np.ndarray:
    """True for items whose cluster has fewer than `min_size` members (SCIP: corrupted code clusters small)."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or (len(labels) and labels.min() < 0):
        raise ValueError("labels must be a 1-D array of non-negative cluster ids")
    if not len(labels):
        return np.zeros(0, dtype=bool)
    return np.bincount(labels)[labels] < min_size


__all__ = ["SIM_ATOL", "SemDedupResult", "centroid_outlier_scores", "default_k", "long_file_mask", "normalize_rows",
           "semdedup", "small_cluster_flags", "spherical_kmeans"]
