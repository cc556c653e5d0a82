"""Batch methods (semdedup, long_file, outlier) inside score_batch: wiring, thresholds, hand-checked results."""

from __future__ import annotations

import numpy as np
import pytest
from test_quality_semdedup import DISTINCT, EPS, GROUPS

from prunefusion.quality import semdedup as sd
from prunefusion.quality.batch_methods import LongFile, Outlier, SemDedup, apply_batch_methods
from prunefusion.quality.pipeline import DOCUMENT_METHODS, ScoreOptions, score_batch
from prunefusion.quality.sharma import load_weights


def test_long_file_rejects_the_longest_percent_of_the_batch():
    texts = ["x" * n for n in (5, 50, 7, 3, 49, 8, 1, 2, 6, 4)]
    verdicts = apply_batch_methods(texts, [LongFile(drop_top_percent=20)], embed=lambda: pytest.fail("no embedding"))
    assert [v.reasons for v in verdicts] == [["long_file"] if n in (50, 49) else [] for n in map(len, texts)]


def test_verdicts_merge_and_the_batch_is_embedded_once():
    # rows 0 and 1 nearly identical, 2 and 3 far apart; row 1 is the longest
    x = np.array([[1.0, 0.0, 0.0], [0.999, 0.04, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    calls = []

    def embed():
        calls.append(1)
        return x

    texts = ["a", "bbbbbbbb", "c", "d"]
    methods = [SemDedup(eps=0.01, clusters=1), LongFile(drop_top_percent=25), Outlier(clusters=1)]
    verdicts = apply_batch_methods(texts, methods, embed)
    assert len(calls) == 1
    expected = sd.semdedup(x, eps=0.01, k=1)
    dropped = int(np.flatnonzero(~expected.keep)[0])
    assert dropped in (0, 1) and verdicts[dropped].duplicate_of == 1 - dropped
    assert "semdedup_duplicate" in verdicts[dropped].reasons
    assert verdicts[1].reasons[-1] == "long_file"
    centroids, labels = sd.spherical_kmeans(x, 1)
    distances = sd.centroid_outlier_scores(x, centroids, labels)
    assert [v.signals["centroid_distance"] for v in verdicts] == pytest.approx(distances.tolist())
    flagged = apply_batch_methods(texts, [Outlier(drop_top_percent=25, clusters=1)], embed)
    assert [v.reasons for v in flagged] == [["centroid_outlier"] if i == int(np.argmax(distances)) else []
                                            for i in range(4)]


@pytest.mark.parametrize(("thresholds", "needle"), [
    ({"semdedup": {"eps": 3.0}}, "semdedup.eps"),
    ({"semdedup": {"epsilon": 0.1}}, "unknown threshold 'epsilon' for semdedup"),
    ({"long_file": {"drop_top_percent": 101.0}}, "long_file.drop_top_percent"),
    ({"outlier": {"drop_top_percent": 5.0}}, "'outlier', which is not among the selected"),
    ({"sharma": {"x": 1.0}}, "'sharma', which has none"),
])
def test_bad_batch_thresholds_name_the_problem(thresholds, needle):
    with pytest.raises(ValueError, match=needle):
        ScoreOptions(methods=("sharma", "semdedup", "long_file"), thresholds=thresholds).check()


def test_batch_methods_are_opt_in():
    assert ScoreOptions().methods == DOCUMENT_METHODS
    assert not {"semdedup", "long_file", "outlier"} & set(DOCUMENT_METHODS)


def test_score_batch_semdedup_on_real_embeddings_keeps_one_per_group(prunefusion_home):
    texts = [t for group in GROUPS for t in group] + DISTINCT
    docs = [(f"d{i}", t) for i, t in enumerate(texts)]
    options = ScoreOptions(methods=("sharma", "semdedup"), thresholds={"semdedup": {"eps": EPS}})
    result = score_batch(docs, options, load_weights(None))
    by_id = {r.id: r for r in result.results}
    start = 0
    for group in GROUPS:
        ids = [f"d{i}" for i in range(start, start + len(group))]
        start += len(group)
        kept = [i for i in ids if "semdedup_duplicate" not in by_id[i].reasons]
        assert len(kept) == 1
        assert all(by_id[i].duplicate_of == kept[0] for i in ids if i != kept[0])
    assert all("semdedup_duplicate" not in by_id[f"d{start + j}"].reasons for j in range(len(DISTINCT)))
    assert result.reason_counts["semdedup_duplicate"] == sum(len(g) - 1 for g in GROUPS)
