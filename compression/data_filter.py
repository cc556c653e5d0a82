"""A job's calibration and healing text through the quality filter (the `filter:` of `calibration` and `heal`).

    heal:
      data: [corpus.jsonl]
      filter:
        methods: [sharma, gopher_quality, gopher_repetition, semdedup]   # default: the Sharma score and every rule
        thresholds: {gopher_quality.min_doc_words: 20}                   # as `prunefusion score --threshold`
        min_score: 0.2                                                   # Sharma score floor
        keep_fraction: 0.6                                               # then at most the best 60% by score

The same scoring `prunefusion score` and the QualityFilter service run (quality/pipeline.py `score_batch`): a
document any method gives a reason is dropped; of the rest, the highest Sharma scores are kept, at most
`keep_fraction` of the input. This runs before tokenization, as the job's `filter` stage: the kept documents are
written to filter/<set>.jsonl with the per-reason counts, the score histogram and the digests of the filter's config
and of what it kept, so a rerun reads the same text back and a resumed heal trains on exactly what it began with.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated

import numpy as np
from pydantic import Field, model_validator

from prunefusion.compression.records import FilteredSet
from prunefusion.typed_config import StrictModel

KEEP_FRACTION = "below_keep_fraction"  # the reason of a document that passed every method but scored too low


class FilterSpec(StrictModel):
    methods: list[str] | None = None  # None: the Sharma score and every rule family (quality.pipeline)
    thresholds: dict[str, float] = {}  # "family.name": value
    min_score: Annotated[float, Field(ge=0, le=1)] | None = None
    keep_fraction: Annotated[float, Field(gt=0, le=1)] = 1.0
    rule_profile: str | None = None  # None: the default (datatrove)

    @model_validator(mode="after")
    def _valid(self) -> FilterSpec:
        options = self.options()
        options.check()  # unknown methods, thresholds and values are refused when the job loads
        if self.keep_fraction < 1 and "sharma" not in options.methods:
            raise ValueError("keep_fraction ranks by the Sharma score: it needs the 'sharma' method")
        return self

    def options(self):
        from prunefusion.quality.pipeline import ScoreOptions, parse_thresholds

        values = {"thresholds": parse_thresholds(self.thresholds), "min_score": self.min_score}
        if self.methods is not None:
            values["methods"] = tuple(self.methods)
        if self.rule_profile is not None:
            values["rule_profile"] = self.rule_profile
        return ScoreOptions(**values)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(), sort_keys=True).encode()).hexdigest()


def kept_indices(scores: np.ndarray, passed: np.ndarray, keep_fraction: float) -> np.ndarray:
    """Indices (in input order) of the documents kept: those that passed every method, best score first, at most
    floor(keep_fraction x all) of them (ties broken by input order). Pure: tested against a by-hand example."""
    budget = int(np.floor(keep_fraction * len(scores) + 1e-9))
    candidates = np.flatnonzero(passed)
    if keep_fraction >= 1 or len(candidates) <= budget:
        return candidates
    ranked = candidates[np.argsort(-np.nan_to_num(scores[candidates], nan=-1.0), kind="stable")]
    return np.sort(ranked[:budget])


def filter_texts(texts: list[str], spec: FilterSpec) -> tuple[list[str], np.ndarray, np.ndarray, dict[str, int]]:
    """(kept texts, every document's score (NaN: not scored), the kept mask, reason counts)."""
    from prunefusion.quality.pipeline import score_batch
    from prunefusion.quality.sharma import load_weights

    result = score_batch([(str(i), t) for i, t in enumerate(texts)], spec.options(), load_weights())
    scores = np.array([np.nan if r.score is None else r.score for r in result.results], dtype=float)
    passed = np.array([r.keep for r in result.results], dtype=bool)
    keep = kept_indices(scores, passed, spec.keep_fraction)
    mask = np.zeros(len(texts), dtype=bool)
    mask[keep] = True
    counts = dict(result.reason_counts)
    if (dropped := int((passed & ~mask).sum())) > 0:
        counts[KEEP_FRACTION] = dropped
    return [texts[i] for i in keep], scores, mask, counts


def run_filter(name: str, texts: list[str], spec: FilterSpec, work: Path) -> FilteredSet:
    """Filter one set and write filter/<name>.jsonl and filter/<name>_scores.png under the job's work dir."""
    from prunefusion.atomic import write_text_atomic
    from prunefusion.quality.batch import score_histogram

    if not texts:
        raise ValueError(f"{name}.filter: there is no text to filter")
    kept, scores, mask, counts = filter_texts(texts, spec)
    if not kept:
        raise ValueError(f"{name}.filter kept none of the {len(texts)} documents ({counts}): loosen it")
    folder = work / "filter"
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / f"{name}.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in kept))
    histogram = folder / f"{name}_scores.png"
    score_histogram(scores, mask, histogram, title=f"{name}: kept {len(kept)} of {len(texts)}")
    digest = hashlib.sha256()
    for text in kept:
        digest.update(hashlib.sha256(text.encode()).digest())
    valid = ~np.isnan(scores)
    return FilteredSet(
        documents=len(texts), kept=len(kept), reason_counts=dict(sorted(counts.items(), key=lambda kv: -kv[1])),
        mean_score_kept=float(scores[valid & mask].mean()) if (valid & mask).any() else None,
        mean_score_all=float(scores[valid].mean()) if valid.any() else None,
        config=spec.model_dump(), config_digest=spec.digest(), kept_digest=digest.hexdigest(),
        file=f"filter/{name}.jsonl", histogram=f"filter/{histogram.name}" if histogram.is_file() else "")


def read_kept(work: Path, filtered: FilteredSet) -> list[str]:
    """The kept texts back from the stage's file."""
    with open(work / filtered.file, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]
