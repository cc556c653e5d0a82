"""One scoring request over a batch of documents: the Sharma score and rule filters, annotate or drop (pure).

Methods: "sharma" (the score; with a minimum score it adds the reason `sharma_below_min_score`) and the rule filter
families of rules.py. A document is kept when no method gives it a reason and, when asked, it is not in the
batch's bottom `drop_bottom_percent` by score. Annotate mode returns every document with its keep flag; drop mode
returns the kept ones only. The gRPC servicer and the batch CLI both call `score_batch`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from prunefusion.quality.rules import RULE_FILTERS, all_reason_codes, build_filters
from prunefusion.quality.sharma import Weights, document_score

METHODS = ("sharma", *RULE_FILTERS)
BELOW_MIN_SCORE, BOTTOM_PERCENTILE = "sharma_below_min_score", "sharma_bottom_percentile"


def parse_thresholds(flat: dict[str, float]) -> dict[str, dict[str, float]]:
    """{"family.name": value} -> {family: {name: value}}; ValueError for a key that is not FAMILY.NAME (unknown names
    and bad values are reported by ScoreOptions.check)."""
    nested: dict[str, dict[str, float]] = {}
    for key, value in flat.items():
        family, dot, name = key.partition(".")
        if not dot or not family or not name:
            raise ValueError(f"threshold key {key!r} is not FAMILY.NAME, e.g. gopher_quality.min_words")
        nested.setdefault(family, {})[name] = value
    return nested


def scoring_executor(workers: int):
    """`workers` spawned processes (the pipeline is pure Python: threads would share one core; spawned, not forked,
    because forking a process that runs gRPC is unsafe), or one thread for 0."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

    if workers > 0:
        return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    return ThreadPoolExecutor(1, thread_name_prefix="quality")


def reason_codes() -> list[str]:
    return [BELOW_MIN_SCORE, BOTTOM_PERCENTILE, *all_reason_codes()]


@dataclass(frozen=True)
class ScoreOptions:
    methods: tuple[str, ...] = METHODS
    thresholds: dict[str, dict[str, float]] = field(default_factory=dict)  # rule family -> threshold -> value
    min_score: float | None = None
    drop_bottom_percent: float | None = None
    drop: bool = False  # False: annotate (every document returned)
    line_spans: bool = False

    def check(self) -> None:
        """ValueError naming what is wrong (unknown method or threshold, a value out of range)."""
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method {unknown[0]!r}; known: {list(METHODS)}")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods named more than once: {list(self.methods)}")
        if (self.min_score is not None or self.drop_bottom_percent is not None) and "sharma" not in self.methods:
            raise ValueError("min_score and drop_bottom_percent need the 'sharma' method")
        if self.min_score is not None and not 0.0 <= self.min_score <= 1.0:
            raise ValueError(f"min_score must be in [0, 1], got {self.min_score}")
        if self.drop_bottom_percent is not None and not 0.0 <= self.drop_bottom_percent < 100.0:
            raise ValueError(f"drop_bottom_percent must be in [0, 100), got {self.drop_bottom_percent}")
        build_filters([m for m in self.methods if m != "sharma"], self.thresholds)


@dataclass(frozen=True)
class DocumentResult:
    id: str
    score: float | None  # None when "sharma" is not among the methods
    keep: bool
    reasons: tuple[str, ...]
    signals: dict[str, float]  # Sharma filter pass rates over lines
    lines: tuple[tuple[int, int, float], ...] = ()  # (start, end, line score) when line spans were asked for


@dataclass(frozen=True)
class BatchResult:
    results: tuple[DocumentResult, ...]  # every document (annotate) or the kept ones (drop)
    documents: int
    kept: int
    mean_score: float | None
    reason_counts: dict[str, int]


def score_batch(documents: list[tuple[str, str]], options: ScoreOptions, weights: Weights) -> BatchResult:
    """(id, text) pairs -> per-document results and batch statistics."""
    options.check()
    rules = build_filters([m for m in options.methods if m != "sharma"], options.thresholds)
    scored = []
    for doc_id, text in documents:
        reasons: list[str] = []
        for rule in rules:
            reasons += rule.check(text)
        if "sharma" in options.methods:
            s = document_score(text, weights)
            if options.min_score is not None and s.score < options.min_score:
                reasons.append(BELOW_MIN_SCORE)
            lines = (tuple((a, b, score) for (a, b), score in zip(s.line_spans, s.line_scores, strict=True))
                     if options.line_spans else ())
            scored.append([doc_id, s.score, reasons, s.signals, lines])
        else:
            scored.append([doc_id, None, reasons, {}, ()])
    if options.drop_bottom_percent and scored:
        scores = np.array([row[1] for row in scored])
        cutoff = np.percentile(scores, options.drop_bottom_percent)
        for row in scored:
            if row[1] < cutoff:
                row[2].append(BOTTOM_PERCENTILE)
    results = [DocumentResult(i, score, not reasons, tuple(reasons), signals, lines)
               for i, score, reasons, signals, lines in scored]
    counts: dict[str, int] = {}
    for r in results:
        for reason in r.reasons:
            counts[reason] = counts.get(reason, 0) + 1
    sharma = [r.score for r in results if r.score is not None]
    kept = sum(r.keep for r in results)
    returned = tuple(r for r in results if r.keep) if options.drop else tuple(results)
    return BatchResult(returned, len(results), kept, float(np.mean(sharma)) if sharma else None, counts)
