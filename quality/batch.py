"""`prunefusion score FILES...`: score JSONL, Parquet, `datasets` folders and text files on local worker processes
or on Ray, write the kept and rejected documents with their scores and reasons, and a report (per-reason counts,
score histogram).

Inputs (corpus_sources.py): JSONL files hold one document per line (a "text" field; "id" optional, default
FILE:LINE), Parquet files and `datasets` save_to_disk folders one per row (default id FILE:ROW); any other file is one
document (its id is the path). Every output record is the input record plus a "quality" object: score, keep,
reasons, and the per-filter signals. In the default rule profile (datatrove) a kept document's "text" is what C4
left of it, as a datatrove pipeline writes it (quality.rewritten says so); --keep-text writes the input text instead.

The run streams: units of --batch-size documents are scored and written to a work folder (default OUT.work,
removed after a successful run), then merged in input order (corpus_work.py). A killed run, rerun with the same
command, resumes without rescoring finished units. `--shard RANK/WORLD --work DIR` scores only every WORLD-th unit
(a Slurm array task, a k8s indexed Job's pod); `prunefusion score merge --work DIR --out ...` then writes the
outputs once every shard has finished.

Corpus-level decisions, over all inputs together and exact however the units were scheduled:
--drop-bottom-percent (the lowest Sharma scores), --semdedup EPS (near-duplicates by the ONNX MiniLM embeddings,
reason `semdedup_duplicate`, keeping in each duplicate group the document farthest from its cluster centroid; the
kept one is named in quality.duplicate_of) and --long-files PERCENT (the longest documents, reason `long_file`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np

from prunefusion.quality.batch_methods import LongFile, SemDedup
from prunefusion.quality.corpus_executors import EXECUTORS
from prunefusion.quality.corpus_work import (
    MergeOptions,
    MergeResult,
    ScoringJob,
    is_done,
    load_manifest,
    merge,
    open_work,
    scoring_options,
)
from prunefusion.quality.pipeline import DOCUMENT_METHODS, ScoreOptions, parse_thresholds
from prunefusion.quality.rule_profiles import DEFAULT_RULE_PROFILE, RULE_PROFILES


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


def _shard(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    rank, _, world = value.partition("/")
    try:
        rank_n, world_n = int(rank), int(world)
    except ValueError:
        raise ValueError(f"--shard {value!r}: expected RANK/WORLD, e.g. 0/4") from None
    if not 0 <= rank_n < world_n:
        raise ValueError(f"--shard {value!r}: RANK must be in [0, WORLD)")
    return rank_n, world_n


def add_output_arguments(p: argparse.ArgumentParser, *, out_required: bool) -> None:
    """The options of the merge: outputs and the corpus-level decisions (shared by `score files` and `score merge`)."""
    p.add_argument("--out", type=Path, required=out_required, help="kept documents (JSONL)")
    p.add_argument("--rejected", type=Path, help="rejected documents (JSONL)")
    p.add_argument("--report", type=Path, help="a folder for summary.json, report.md and score_histogram.png")
    p.add_argument("--keep-text", action="store_true",
                   help="write kept documents' input text, not the text the rule filters left (C4's kept lines)")
    p.add_argument("--drop-bottom-percent", type=float, help="reject the lowest-scoring percent of all documents")
    p.add_argument("--semdedup", type=float, metavar="EPS", help="reject near-duplicates: cosine > 1 - EPS "
                   "(e.g. 0.01) to a kept document of the same cluster")
    p.add_argument("--long-files", type=float, metavar="PERCENT", help="reject the longest PERCENT of documents")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `prunefusion score [files] FILES...`."""
    p.add_argument("files", nargs="+", type=Path, help="JSONL, Parquet or text files, or `datasets` folders")
    add_output_arguments(p, out_required=False)
    p.add_argument("--methods", nargs="+", default=list(DOCUMENT_METHODS), choices=DOCUMENT_METHODS,
                   help="default: all of them (the batch methods are --semdedup and --long-files here, over all "
                        "inputs at once, not per chunk)")
    p.add_argument("--threshold", action="append", default=[], metavar="FAMILY.NAME=VALUE",
                   help="override a rule threshold, named as the rule profile names it (repeatable)")
    p.add_argument("--rule-profile", default=DEFAULT_RULE_PROFILE, choices=list(RULE_PROFILES),
                   help="rule definitions: " + "; ".join(f"{k}: {v.summary}" for k, v in RULE_PROFILES.items())
                   + f" (default {DEFAULT_RULE_PROFILE})")
    p.add_argument("--min-score", type=float)
    p.add_argument("--weights", type=Path, help="Sharma weights JSON (default: the shipped calibration)")
    p.add_argument("--executor", choices=list(EXECUTORS), default="local",
                   help="local: worker processes here; ray: Ray Data actors (pip install 'prunefusion[ray]')")
    p.add_argument("--address", help="--executor ray: an existing Ray cluster (auto, or ray://HOST:10001); "
                   "default: start a local Ray with --workers CPUs")
    p.add_argument("--workers", type=int, default=2, help="scoring processes or Ray actors (local: 0 is this process)")
    p.add_argument("--batch-size", type=int, default=256, help="documents per work unit (the unit of scheduling "
                   "and of resume)")
    p.add_argument("--work", type=Path, help="the work folder (default OUT.work, removed after a successful run; "
                   "one you name is kept)")
    p.add_argument("--shard", metavar="RANK/WORLD", help="score only units RANK, RANK+WORLD, ... into --work, then "
                   "stop: `prunefusion score merge --work DIR --out ...` once every shard has finished")


def _merge_options(args: argparse.Namespace, methods: tuple[str, ...]) -> MergeOptions:
    """The corpus-level options, checked by the per-request checks of the same options (a percentile needs the
    'sharma' method among the `methods` the units were scored with; SemDeDup's eps and the long-file percent their
    ranges)."""
    dataclasses.replace(ScoreOptions(methods=methods), drop_bottom_percent=args.drop_bottom_percent).check()
    if args.semdedup is not None:
        SemDedup(eps=args.semdedup)
    if args.long_files is not None:
        LongFile(drop_top_percent=args.long_files)
    return MergeOptions(args.drop_bottom_percent, args.long_files, args.semdedup, args.keep_text)


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from prunefusion.quality.sharma import load_weights

    options = ScoreOptions(methods=tuple(args.methods), thresholds=parse_thresholds(_threshold_pairs(args.threshold)),
                           min_score=args.min_score, rule_profile=args.rule_profile)
    options.check()
    merge_options = _merge_options(args, options.methods)
    shard = _shard(args.shard)
    if shard is None and args.out is None:
        raise ValueError("--out is required (only a --shard run writes no outputs)")
    if shard is not None:
        if args.work is None:
            raise ValueError("--shard needs --work DIR: a folder every shard and the merge can reach")
        merge_only = [f"--{k.replace('_', '-')}" for k in ("out", "rejected", "report", "drop_bottom_percent",
                                                           "long_files", "keep_text") if getattr(args, k)]
        if merge_only:
            raise ValueError(f"{', '.join(merge_only)}: options of `prunefusion score merge`, not of a --shard run")
    weights = load_weights(args.weights)
    work = args.work or args.out.with_name(args.out.name + ".work")
    outputs = tuple(p for p in (work, args.out, args.rejected, args.report) if p is not None)
    units = open_work(work, args.files, scoring_options(options, args.weights, weights), args.batch_size,
                      exclude=outputs, replace_other=args.work is None)
    embeddings = args.semdedup is not None
    mine = [u for u in units if shard is None or u.index % shard[1] == shard[0]]
    todo = [u for u in mine if not is_done(work, u.index, embeddings)]
    job = ScoringJob(str(work.resolve()), options, weights, embeddings)
    started = time.perf_counter()
    total = sum(u.documents for u in mine)
    with tqdm(total=total, initial=total - sum(u.documents for u in todo), desc="score", unit="doc") as bar:
        EXECUTORS[args.executor](todo, job, args.workers, args.address, lambda s: bar.update(s["documents"]))
    seconds = time.perf_counter() - started
    scored = sum(u.documents for u in todo)
    rate = f"{scored / seconds:.0f} docs/s" if scored and seconds else "nothing left to score"
    if shard is not None:
        print(f"shard {shard[0]}/{shard[1]}: {len(todo)} of its {len(mine)} units scored ({rate}, "
              f"{args.executor} executor, {args.workers} workers) into {work}")
        return 0
    _finish(work, merge_options, args, {
        "seconds": seconds, "documents_scored": scored, "units_resumed": len(units) - len(todo),
        "documents_per_second": scored / seconds if scored and seconds else None, "executor": args.executor,
        "workers": args.workers})
    print(f"({rate} with {args.workers} {args.executor} workers; {len(units) - len(todo)} units resumed)")
    if args.work is None:
        shutil.rmtree(work)
    return 0


def _finish(work: Path, merge_options: MergeOptions, args: argparse.Namespace, run_info: dict) -> None:
    """Merge, then write the report (the summary with `run_info`: how pass 1 ran) and print the counts."""
    manifest = load_manifest(work)
    started = time.perf_counter()
    result: MergeResult = merge(work, merge_options, args.out, args.rejected)
    options = manifest["scoring"]["options"]
    summary = {"documents": result.documents, "kept": result.kept, "rejected": result.documents - result.kept,
               "reason_counts": result.reason_counts, "units": result.units,
               "merge_seconds": time.perf_counter() - started, "methods": list(options["methods"]),
               "rule_profile": options["rule_profile"], "weights": manifest["scoring"]["weights_data"],
               "corpus_decisions": dataclasses.asdict(merge_options),
               "peak_rss_mb_per_worker": result.peak_rss_mb_per_worker, **run_info}
    if args.report:
        write_report(args.report, summary, result.scores, result.keep)
    print(f"{result.documents} documents: kept {result.kept}, rejected {result.documents - result.kept}")
    for reason, n in summary["reason_counts"].items():
        print(f"  {reason:<32} {n}")


def add_merge_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `prunefusion score merge`."""
    p.add_argument("--work", type=Path, required=True, help="the work folder every shard wrote into")
    add_output_arguments(p, out_required=True)


def run_merge(args: argparse.Namespace) -> int:
    methods = tuple(load_manifest(args.work)["scoring"]["options"]["methods"])
    _finish(args.work, _merge_options(args, methods), args, {"merged_from": str(args.work)})
    return 0


def score_histogram(scores: np.ndarray, kept: np.ndarray, path: Path, title: str | None = None) -> None:
    """Sharma scores of the kept and the rejected documents (NaN: not scored, left out); nothing when none has one.
    Also the compression job's filter stage figure (compression/data_filter.py)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    valid = ~np.isnan(scores)
    if not valid.any():
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.linspace(0, 1, 41)
    ax.hist(scores[valid & kept], bins=bins, alpha=0.7, label="kept")
    ax.hist(scores[valid & ~kept], bins=bins, alpha=0.7, label="rejected")
    ax.set_xlabel("Sharma document score")
    ax.set_ylabel("documents")
    if title:
        ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(folder: Path, summary: dict, scores: np.ndarray, kept: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    score_histogram(scores, kept, folder / "score_histogram.png")
    lines = [f"# Quality scoring: {summary['documents']} documents", "",
             f"Kept {summary['kept']}, rejected {summary['rejected']}; methods {', '.join(summary['methods'])} "
             f"(rule profile {summary['rule_profile']}); "
             + (f"{summary['documents_per_second']:.0f} documents/s with {summary['workers']} {summary['executor']} "
              "workers." if summary.get("documents_per_second") else "Merged from units scored earlier."), "",
             "| reason | documents |", "|---|---|",
             *[f"| {reason} | {n} |" for reason, n in summary["reason_counts"].items()], "",
             "![score histogram](score_histogram.png)", ""]
    (folder / "report.md").write_text("\n".join(lines))
