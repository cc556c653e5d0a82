"""`prunefusion score FILES...`: score JSONL and text files on every core, write the kept and rejected documents
with their scores and reasons, and a report (per-reason counts, score histogram).

JSONL files hold one document per line (a "text" field; "id" optional, default FILE:LINE); any other file is one
document (its id is the path). Every output record is the input record plus a "quality" object: score, keep,
reasons, and the per-filter signals. --drop-bottom-percent applies to the whole input, not per batch. In the
default rule profile (datatrove) a kept document's "text" is what C4 left of it, as a datatrove pipeline writes it
(quality.rewritten says so); --keep-text writes the input text instead.

Corpus-level methods, over all inputs together: --semdedup EPS embeds every document with the ONNX MiniLM and
rejects near-duplicates (reason `semdedup_duplicate`, keeping in each duplicate group the document farthest from its
cluster centroid); --long-files PERCENT rejects the longest PERCENT of documents (reason `long_file`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from prunefusion.quality.pipeline import (
    BOTTOM_PERCENTILE,
    DOCUMENT_METHODS,
    ScoreOptions,
    parse_thresholds,
    score_batch,
    scoring_executor,
)
from prunefusion.quality.rule_profiles import DEFAULT_RULE_PROFILE, RULE_PROFILES


def read_documents(paths: list[Path]) -> list[dict]:
    """Records with "id" and "text" (other JSONL fields kept)."""
    records: list[dict] = []
    for path in paths:
        if path.suffix == ".jsonl":
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    text = record["text"]
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise ValueError(f"{path}:{number}: expected a JSON object with a 'text' field") from err
                records.append({**record, "id": str(record.get("id", f"{path}:{number}")), "text": text})
        else:
            records.append({"id": str(path), "text": path.read_text(errors="replace")})
    ids = [r["id"] for r in records]
    if len(set(ids)) != len(ids):
        raise ValueError("document ids must be unique across the inputs")
    return records


def _threshold_pairs(items: list[str]) -> dict[str, float]:
    """["FAMILY.NAME=VALUE", ...] -> {"FAMILY.NAME": value}."""
    pairs = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            pairs[key] = float(value)
        except ValueError:
            raise ValueError(f"--threshold {item!r}: expected FAMILY.NAME=NUMBER, e.g. "
                             "gopher_quality.min_doc_words=20") from None
    return pairs


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `prunefusion score [files] FILES...`."""
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True, help="kept documents (JSONL)")
    p.add_argument("--rejected", type=Path, help="rejected documents (JSONL)")
    p.add_argument("--report", type=Path, help="a folder for summary.json, report.md and score_histogram.png")
    p.add_argument("--methods", nargs="+", default=list(DOCUMENT_METHODS), choices=DOCUMENT_METHODS,
                   help="default: all of them (the batch methods are --semdedup and --long-files here, over all "
                        "inputs at once, not per chunk)")
    p.add_argument("--threshold", action="append", default=[], metavar="FAMILY.NAME=VALUE",
                   help="override a rule threshold, named as the rule profile names it (repeatable)")
    p.add_argument("--rule-profile", default=DEFAULT_RULE_PROFILE, choices=list(RULE_PROFILES),
                   help="rule definitions: " + "; ".join(f"{k}: {v.summary}" for k, v in RULE_PROFILES.items())
                   + f" (default {DEFAULT_RULE_PROFILE})")
    p.add_argument("--keep-text", action="store_true",
                   help="write kept documents' input text, not the text the rule filters left (C4's kept lines)")
    p.add_argument("--min-score", type=float)
    p.add_argument("--drop-bottom-percent", type=float, help="reject the lowest-scoring percent of all documents")
    p.add_argument("--weights", type=Path, help="Sharma weights JSON (default: the shipped calibration)")
    p.add_argument("--semdedup", type=float, metavar="EPS", help="reject near-duplicates: cosine > 1 - EPS "
                   "(e.g. 0.01) to a kept document of the same cluster")
    p.add_argument("--long-files", type=float, metavar="PERCENT", help="reject the longest PERCENT of documents")
    p.add_argument("--workers", type=int, default=2, help="scoring processes (0: this process)")
    p.add_argument("--batch-size", type=int, default=256)


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from prunefusion.quality.sharma import load_weights

    options = ScoreOptions(methods=tuple(args.methods), thresholds=parse_thresholds(_threshold_pairs(args.threshold)),
                           min_score=args.min_score, rule_profile=args.rule_profile)
    options.check()
    if args.drop_bottom_percent is not None:
        dataclasses.replace(options, drop_bottom_percent=args.drop_bottom_percent).check()
    weights = load_weights(args.weights)
    records = read_documents(args.files)
    started = time.perf_counter()
    batches = [records[i:i + args.batch_size] for i in range(0, len(records), args.batch_size)]
    executor = scoring_executor(args.workers)
    results = []
    with executor, tqdm(total=len(records), desc="score", unit="doc") as bar:
        jobs = [executor.submit(score_batch, [(r["id"], r["text"]) for r in b], options, weights) for b in batches]
        for job in jobs:  # in order
            results += job.result().results
            bar.update(len(results) - bar.n)
    seconds = time.perf_counter() - started
    reasons = [list(r.reasons) for r in results]
    scores = np.array([r.score if r.score is not None else np.nan for r in results])
    if args.drop_bottom_percent:
        cutoff = np.nanpercentile(scores, args.drop_bottom_percent)
        for doc_reasons, score in zip(reasons, scores, strict=True):
            if score < cutoff:
                doc_reasons.append(BOTTOM_PERCENTILE)
    corpus_reasons(records, reasons, args)
    counts: dict[str, int] = {}
    kept_n = 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as files:  # both files closed however the loop ends
        kept = files.enter_context(open(args.out, "w"))
        rejected = files.enter_context(open(args.rejected, "w")) if args.rejected else None
        for record, result, doc_reasons in zip(records, results, reasons, strict=True):
            keep = not doc_reasons
            kept_n += keep
            for reason in doc_reasons:
                counts[reason] = counts.get(reason, 0) + 1
            quality = {"score": result.score, "keep": keep, "reasons": doc_reasons, "signals": result.signals}
            if keep and result.text is not None and not args.keep_text:
                record, quality["rewritten"] = {**record, "text": result.text}, True
            line = json.dumps({**record, "quality": quality}) + "\n"
            if keep:
                kept.write(line)
            elif rejected is not None:
                rejected.write(line)
    summary = {"documents": len(records), "kept": kept_n, "rejected": len(records) - kept_n,
               "reason_counts": dict(sorted(counts.items(), key=lambda kv: -kv[1])), "seconds": seconds,
               "documents_per_second": len(records) / seconds if seconds else None, "workers": args.workers,
               "methods": list(options.methods), "rule_profile": options.rule_profile,
               "weights": weights.provenance.get("data", "uniform")}
    if args.report:
        write_report(args.report, summary, scores, np.array([not r for r in reasons]))
    print(f"{len(records)} documents: kept {kept_n}, rejected {len(records) - kept_n} "
          f"({summary['documents_per_second']:.0f} docs/s with {args.workers} workers)")
    for reason, n in summary["reason_counts"].items():
        print(f"  {reason:<32} {n}")
    return 0


def corpus_reasons(records: list[dict], reasons: list[list[str]], args: argparse.Namespace) -> None:
    """Add the corpus-level reasons (SemDeDup, long files) in place."""
    from prunefusion.quality import semdedup

    if args.long_files:
        keep = semdedup.long_file_mask([len(r["text"]) for r in records], args.long_files)
        for doc_reasons, kept in zip(reasons, keep, strict=True):
            if not kept:
                doc_reasons.append("long_file")
    if args.semdedup is not None:
        from prunefusion.quality.embeddings import default_embedder

        embeddings = default_embedder().embed([r["text"] for r in records])
        result = semdedup.semdedup(embeddings, eps=args.semdedup)
        for doc_reasons, kept in zip(reasons, result.keep, strict=True):
            if not kept:
                doc_reasons.append("semdedup_duplicate")


def write_report(folder: Path, summary: dict, scores: np.ndarray, kept: np.ndarray) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    valid = ~np.isnan(scores)
    if valid.any():
        fig, ax = plt.subplots(figsize=(7, 4))
        bins = np.linspace(0, 1, 41)
        ax.hist(scores[valid & kept], bins=bins, alpha=0.7, label="kept")
        ax.hist(scores[valid & ~kept], bins=bins, alpha=0.7, label="rejected")
        ax.set_xlabel("Sharma document score")
        ax.set_ylabel("documents")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(folder / "score_histogram.png", dpi=120)
        plt.close(fig)
    lines = [f"# Quality scoring: {summary['documents']} documents", "",
             f"Kept {summary['kept']}, rejected {summary['rejected']}; methods {', '.join(summary['methods'])} "
             f"(rule profile {summary['rule_profile']}); "
             f"{summary['documents_per_second']:.0f} documents/s with {summary['workers']} workers.", "",
             "| reason | documents |", "|---|---|",
             *[f"| {reason} | {n} |" for reason, n in summary["reason_counts"].items()], "",
             "![score histogram](score_histogram.png)", ""]
    (folder / "report.md").write_text("\n".join(lines))
