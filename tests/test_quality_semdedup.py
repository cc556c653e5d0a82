"""SemDeDup on real MiniLM embeddings and against a brute-force reference; spherical k-means; SCIP and long files."""

from __future__ import annotations

import math

import numpy as np
import pytest

from prunefusion.quality.embeddings import default_embedder
from prunefusion.quality.semdedup import (
    SIM_ATOL,
    centroid_outlier_scores,
    default_k,
    long_file_mask,
    normalize_rows,
    semdedup,
    small_cluster_flags,
    spherical_kmeans,
)

# each group: an original, a case or whitespace variant, a punctuation variant (MiniLM cosine to the original
# measured >= 0.991; MiniLM is uncased, so the first variant embeds like the original up to float noise)
GROUPS = [
    ["The quick brown fox jumps over the lazy dog near the river bank.",
     "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG NEAR THE RIVER BANK.",
     "The quick brown fox jumps over the lazy dog near the river bank.."],
    ["Python lists are mutable sequences that can hold objects of any type.",
     "Python  lists are mutable   sequences that can hold objects of any type.",
     "Python lists are mutable sequences that can hold objects of any type.."],
    ["Photosynthesis converts sunlight, water and carbon dioxide into glucose and oxygen.",
     "Photosynthesis converts sunlight, water and carbon dioxide into glucose and oxygen.\n",
     "Photosynthesis converts sunlight; water and carbon dioxide into glucose and oxygen."],
    ["To install the package, run pip install requests in a terminal window.",
     "to install the package, run pip install requests in a terminal window.",
     "To install the package, run pip install requests in a terminal window!"],
]
DISTINCT = [
    "Mount Everest is the highest mountain above sea level.",
    "She practiced the violin every evening after dinner.",
    "The recipe calls for two cups of flour and three eggs.",
    "Neural networks are trained with gradient descent.",
    "The train to Berlin was delayed by forty minutes.",
    "Sea turtles return to the beach where they hatched to lay eggs.",
]
EPS = 0.02  # near-duplicates above 0.99 cosine, distinct sentences below 0.3: any eps in (0.01, 0.7) separates them


@pytest.fixture(scope="module")
def minilm(prunefusion_home):
    texts = [t for group in GROUPS for t in group] + DISTINCT
    return texts, default_embedder(threads=1).embed(texts)  # shares the session's export with the embedding tests


def reference_semdedup(x: np.ndarray, labels: np.ndarray, centroids: np.ndarray, eps: float):
    """The definition, written the slow way: per cluster, farthest from the centroid first, one pair at a time."""
    n = len(x)
    keep = [True] * n
    duplicate_of = [-1] * n
    for cluster in sorted(set(labels.tolist())):
        members = [i for i in range(n) if labels[i] == cluster]
        members.sort(key=lambda i: (float(np.dot(x[i], centroids[cluster])), i))  # least similar = farthest first
        kept: list[int] = []
        for i in members:
            best, best_j = -math.inf, -1
            for j in kept:
                similarity = float(np.dot(x[i], x[j]))
                if similarity > best:
                    best, best_j = similarity, j
            if best > 1 - eps - SIM_ATOL:
                keep[i], duplicate_of[i] = False, best_j
            else:
                kept.append(i)
    return np.array(keep), np.array(duplicate_of)


def planted(seed: int, n: int = 240, d: int = 24) -> np.ndarray:
    """Random unit vectors, a third of them with 1-3 noisy copies at cosines from ~0.9 to ~0.9999."""
    rng = np.random.default_rng(seed)
    base = normalize_rows(rng.standard_normal((n, d)))
    rows = [base]
    for i in rng.choice(n, n // 3, replace=False):
        for _ in range(rng.integers(1, 4)):
            noise = rng.choice([0.01, 0.05, 0.1, 0.2, 0.35])
            rows.append(normalize_rows(base[i] + noise * rng.standard_normal((1, d)) / math.sqrt(d)))
    x = np.concatenate(rows)
    return x[rng.permutation(len(x))]


def test_near_duplicate_sentences_are_removed_and_distinct_ones_kept(minilm):
    texts, vectors = minilm
    result = semdedup(vectors, eps=EPS)
    assert result.k == default_k(len(texts)) == 3
    n_dup = sum(len(g) for g in GROUPS)
    assert result.keep[n_dup:].all()  # distinct sentences
    assert result.removed == n_dup - len(GROUPS)
    start = 0
    for group in GROUPS:
        members = np.arange(start, start + len(group))
        start += len(group)
        assert result.keep[members].sum() == 1
        kept = members[result.keep[members]][0]
        assert (result.duplicate_of[members] == np.where(members == kept, -1, kept)).all()
        # the kept one is the farthest from its centroid (computed directly; float noise allowed for exact ties)
        assert len(set(result.labels[members].tolist())) == 1
        centroid = result.centroids[result.labels[kept]]
        distance = 1 - vectors[members] @ centroid / np.linalg.norm(vectors[members], axis=1)
        farthest = members[distance >= distance.max() - 1e-6]
        assert kept in farthest and len(farthest) < len(members)  # not all tied: the check has teeth


def test_eps_zero_on_real_embeddings_removes_only_identical_token_sequences(minilm):
    _, vectors = minilm
    result = semdedup(vectors, eps=0.0)
    expected = np.ones(len(vectors), bool)
    for g in range(len(GROUPS)):
        expected[3 * g:3 * g + 2] = False  # original and case/whitespace variant: one of the two goes
    removed = ~result.keep
    assert removed.sum() == len(GROUPS) and not (removed & expected).any()


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("eps,k", [(0.005, None), (0.02, None), (0.1, None), (0.02, 5), (0.3, 3)])
def test_semdedup_agrees_with_the_brute_force_definition(seed, eps, k):
    raw = planted(seed) * np.random.default_rng(seed).uniform(0.5, 3.0, (1, 1))  # any scale
    result = semdedup(raw, eps=eps, k=k, seed=seed)
    x = normalize_rows(raw)
    keep, duplicate_of = reference_semdedup(x, result.labels, result.centroids, eps)
    assert 0 < (~keep).sum() < len(x) // 2  # the planted duplicates make the test bite
    np.testing.assert_array_equal(result.keep, keep)
    np.testing.assert_array_equal(result.duplicate_of, duplicate_of)
    centroids, labels = spherical_kmeans(raw, result.k, seed=seed)
    np.testing.assert_array_equal(result.labels, labels)
    np.testing.assert_array_equal(result.centroids, centroids)


def test_only_kept_items_count_so_a_chain_keeps_its_far_end():
    angles = np.radians([0.0, 8.0, 16.0, 30.0])  # A, B, C, E on a circle; centroid near C, E and A farthest
    x = np.stack([np.cos(angles), np.sin(angles), np.zeros(4)], axis=1)
    result = semdedup(x, eps=0.02, k=1)  # cos 8 deg = 0.990 > 0.98 > cos 14 deg = 0.970
    assert result.keep.tolist() == [True, False, True, True]  # B duplicates A; C only duplicates the dropped B
    assert result.duplicate_of.tolist() == [-1, 0, -1, -1]


def test_eps_zero_removes_exact_duplicates_only():
    rng = np.random.default_rng(3)
    x = normalize_rows(rng.standard_normal((50, 384)))
    near = normalize_rows(x[:5] + 0.003 * rng.standard_normal((5, 384)))  # cosine ~0.998: not exact
    data = np.concatenate([x, x[10:15], 7.0 * x[20:22], near])  # exact copies, a scaled copy is the same direction
    result = semdedup(data, eps=0.0)
    copies = {(10 + i, 50 + i) for i in range(5)} | {(20, 55), (21, 56)}
    assert result.removed == len(copies)
    for a, b in copies:
        assert result.keep[a] != result.keep[b]
        dropped, kept = (b, a) if result.keep[a] else (a, b)
        assert result.duplicate_of[dropped] == kept
    assert result.keep[np.r_[0:10, 15:20, 22:50, 57:62]].all()


def test_semdedup_edge_cases():
    assert [default_k(n) for n in (0, 1, 2, 3, 8, 200, 10**6)] == [0, 1, 1, 1, 2, 10, 707]
    empty = semdedup(np.zeros((0, 8), np.float32))
    assert empty.k == 0 and empty.keep.shape == (0,)
    single = semdedup(np.ones((1, 8)))
    assert single.keep.tolist() == [True] and single.k == 1
    with pytest.raises(ValueError, match="eps"):
        semdedup(np.ones((3, 8)), eps=-0.1)
    with pytest.raises(ValueError, match="k must be"):
        semdedup(np.ones((3, 8)), k=4)


def test_spherical_kmeans_is_deterministic_and_recovers_planted_clusters():
    rng = np.random.default_rng(7)
    centers = normalize_rows(rng.standard_normal((6, 32)))
    truth = rng.integers(0, 6, 600)
    x = centers[truth] + 0.08 * rng.standard_normal((600, 32))
    centroids, labels = spherical_kmeans(x, 6, seed=11)
    again = spherical_kmeans(x, 6, seed=11)
    np.testing.assert_array_equal(centroids, again[0])
    np.testing.assert_array_equal(labels, again[1])
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-5)
    # a one-to-one match between true and found clusters, and each centroid next to its true center
    mapping = {t: set(labels[truth == t].tolist()) for t in range(6)}
    assert all(len(found) == 1 for found in mapping.values())
    assert len({found.pop() for found in mapping.values()}) == 6
    assert (centroids @ centers.T).max(axis=1).min() > 0.99


def test_spherical_kmeans_with_as_many_clusters_as_points_gives_each_its_own():
    x = np.random.default_rng(2).standard_normal((12, 5))
    centroids, labels = spherical_kmeans(x, 12, seed=0)
    assert sorted(labels.tolist()) == list(range(12))
    np.testing.assert_allclose(centroids[labels], normalize_rows(x), atol=1e-6)
    # three distinct points, five clusters: k-means++ runs out of new points, nothing breaks
    centroids, labels = spherical_kmeans(np.repeat(np.eye(3), 4, axis=0), 5, seed=0)
    assert np.isfinite(centroids).all() and len(set(labels.tolist())) == 3


def test_long_file_mask_hand_computed():
    lengths = [10, 500, 30, 500, 20, 1000, 5, 40, 60, 70]
    assert long_file_mask(lengths, 20.0).tolist() == [True, True, True, False, True, False, True, True, True, True]
    assert long_file_mask(lengths, 30.0).tolist() == [True, False, True, False, True, False, True, True, True, True]
    assert long_file_mask(lengths, 10.0).tolist() == [True] * 5 + [False] + [True] * 4
    assert long_file_mask(lengths, 9.9).all()  # floor(0.99) = 0 files
    assert long_file_mask(np.arange(100), 2.0).tolist() == [True] * 98 + [False, False]
    assert long_file_mask(np.arange(50), 100.0).sum() == 0
    assert long_file_mask([], 2.0).shape == (0,)
    with pytest.raises(ValueError):
        long_file_mask(lengths, 101.0)


def test_centroid_outlier_scores_hand_computed():
    embeddings = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-3.0, 0.0]])
    centroids = np.array([[1.0, 0.0], [0.0, 5.0]])
    labels = np.array([0, 0, 1, 0])
    scores = centroid_outlier_scores(embeddings, centroids, labels)
    np.testing.assert_allclose(scores, [0.0, 1.0, 1.0 - 1.0 / math.sqrt(2.0), 2.0], atol=1e-6)
    with pytest.raises(ValueError):
        centroid_outlier_scores(embeddings, centroids, np.array([0, 0, 2, 0]))


def test_small_cluster_flags_hand_computed():
    labels = np.array([0, 0, 1, 2, 2, 2, 4])
    assert small_cluster_flags(labels, 2).tolist() == [False, False, True, False, False, False, True]
    assert small_cluster_flags(labels, 3).tolist() == [True, True, True, False, False, False, True]
    assert not small_cluster_flags(labels, 1).any()


def test_spherical_kmeans_against_scikit_learn():
    """scikit-learn's KMeans as the reference: on unit vectors the nearest centroid by cosine is the nearest by
    Euclidean distance, so the assignment must be sklearn's exactly, and the partition of overlapping clusters
    must agree with sklearn's Lloyd k-means and be at least as cohesive in cosine terms."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, pairwise_distances_argmin

    rng = np.random.default_rng(3)
    centers = normalize_rows(rng.standard_normal((8, 16)))
    truth = rng.integers(0, 8, 800)
    x = normalize_rows(centers[truth] + 0.25 * rng.standard_normal((800, 16)))
    centroids, labels = spherical_kmeans(x, 8, seed=0)
    np.testing.assert_array_equal(labels, pairwise_distances_argmin(x, centroids))
    reference = KMeans(8, n_init=10, random_state=0).fit(x).labels_

    def cohesion(assigned: np.ndarray) -> float:  # mean cosine of each point to its cluster's normalised mean
        means = normalize_rows(np.stack([x[assigned == j].sum(axis=0) for j in range(8)]))
        return float(np.einsum("ij,ij->i", x, means[assigned]).mean())

    assert adjusted_rand_score(reference, labels) > 0.9
    assert cohesion(labels) >= cohesion(reference) - 1e-3
