"""A corpus scoring run in two passes over a work folder, so that it streams, resumes and shards.

Pass 1 (`score_unit`, run by an executor, any number at once): one unit of the plan (corpus_sources.py) is read,
scored with `pipeline.score_batch` and written to `units/` as u<INDEX>.jsonl (each line [input record, quality,
rewritten text or null]), u<INDEX>.npy (its MiniLM embeddings, when SemDeDup will need them) and last
u<INDEX>.json (ids, scores, lengths, timings): a unit is done when its .json exists, and every file is written to
a temporary name and renamed, so a killed worker leaves no half unit. A rerun skips done units.

Pass 2 (`merge`, one process): the corpus-level decisions over every unit's ids, scores, lengths and embeddings
(the bottom percentile, long files, SemDeDup: each exact, as over one in-memory corpus), then the units streamed in
order into the kept and rejected files, written under temporary names and renamed at the end.

`manifest.json` records the inputs (path, size, mtime), the scoring options and the plan; a work folder holding
another run's manifest is refused rather than mixed. The merge's options (percentile, SemDeDup eps, long files,
--keep-text) are not part of it: a merge can be rerun with others without rescoring.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import resource
import shutil
import socket
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from prunefusion.atomic import replace_atomically, write_text_atomic
from prunefusion.checkpoints import digest_files
from prunefusion.quality.corpus_sources import Unit, input_files, plan_units, read_unit
from prunefusion.quality.pipeline import BOTTOM_PERCENTILE, ScoreOptions, embedder, score_batch
from prunefusion.quality.sharma import Weights

MANIFEST_VERSION = 1


@dataclass(frozen=True)
class ScoringJob:
    """What pass 1 needs, sent to every worker (pickled: a process pool's or a Ray actor's)."""

    work: str
    options: ScoreOptions
    weights: Weights
    embeddings: bool  # SemDeDup asked for: embed each unit with the ONNX MiniLM


@dataclass(frozen=True)
class MergeOptions:
    drop_bottom_percent: float | None = None
    long_files: float | None = None
    semdedup: float | None = None  # eps
    keep_text: bool = False


def unit_path(work: str | Path, index: int, suffix: str) -> Path:
    return Path(work) / "units" / f"u{index:06d}{suffix}"


def is_done(work: str | Path, index: int, embeddings: bool = False) -> bool:
    """The unit's summary is in place (written last), and its embeddings too when they are needed."""
    return unit_path(work, index, ".json").is_file() and (not embeddings or unit_path(work, index, ".npy").is_file())


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would add ".npy" to the temporary name
        np.save(f, array)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def score_unit(unit: dict, job: ScoringJob) -> dict:
    """Pass 1 for one unit (a Unit.to_dict()); returns its summary (also written as u<INDEX>.json)."""
    started = time.time()
    u = Unit.from_dict(unit)
    records = read_unit(u)
    result = score_batch([(r["id"], r["text"]) for r in records], job.options, job.weights)
    lines = []
    for record, r in zip(records, result.results, strict=True):
        quality = {"score": r.score, "keep": r.keep, "reasons": list(r.reasons), "signals": r.signals}
        lines.append(json.dumps([record, quality, r.text], default=str) + "\n")  # Parquet dates, decimals: as text
    replace_atomically(unit_path(job.work, u.index, ".jsonl"), lambda tmp: tmp.write_text("".join(lines)))
    if job.embeddings:
        from prunefusion.quality.embeddings import EMBEDDING_DIM

        texts = [r["text"] for r in records]
        vectors = embedder().embed(texts) if texts else np.zeros((0, EMBEDDING_DIM), np.float32)
        replace_atomically(unit_path(job.work, u.index, ".npy"), lambda tmp: _save_npy(tmp, vectors))
    summary = {"unit": u.index, "documents": len(records), "ids": [r["id"] for r in records],
               "scores": [r.score for r in result.results], "lengths": [len(r["text"]) for r in records],
               "started": started, "finished": time.time(), "worker": f"{socket.gethostname()}:{os.getpid()}",
               "peak_rss_mb": peak_rss_mb()}
    write_text_atomic(unit_path(job.work, u.index, ".json"), json.dumps(summary))
    return {k: v for k, v in summary.items() if k not in ("ids", "scores", "lengths")}


def open_work(work: Path, paths: list[Path], job_options: dict, docs_per_unit: int, *,
              exclude: tuple[Path, ...] = (), replace_other: bool = False) -> list[Unit]:
    """Plan the run and create or check the work folder's manifest. A folder holding another run (other inputs or
    scoring options) is a ValueError, or with `replace_other` (a default work folder, which no one named) removed
    and started afresh. Shards starting at once all create the same manifest: the first link wins, the others check
    theirs against it."""
    inputs = [{"path": str(p), "size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns}
              for _, p in input_files(paths, exclude)]
    scoring = {**job_options, "docs_per_unit": docs_per_unit}
    digest = hashlib.sha256(json.dumps([inputs, scoring], sort_keys=True).encode()).hexdigest()
    manifest_path = work / "manifest.json"
    if not manifest_path.is_file():
        units = plan_units(paths, docs_per_unit, exclude)
        manifest = {"version": MANIFEST_VERSION, "digest": digest, "inputs": inputs, "scoring": scoring,
                    "units": [u.to_dict() for u in units]}
        (work / "units").mkdir(parents=True, exist_ok=True)
        tmp = work / f".manifest.{uuid.uuid4().hex}.partial"  # unique: pods all run as pid 1 on one volume
        tmp.write_text(json.dumps(manifest, indent=1) + "\n")
        try:
            os.link(tmp, manifest_path)  # fails if another shard made it first: never replaces one
        except FileExistsError:
            pass
        except OSError:  # a file system without hard links (some bucket mounts): a rename, the last one wins
            os.replace(tmp, manifest_path)
        finally:
            tmp.unlink(missing_ok=True)
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("digest") != digest:
        if not replace_other:
            raise ValueError(f"{work} holds a run of other inputs or scoring options (its manifest.json differs): "
                             "remove the folder or choose another --work")
        print(f"{work} held a run of other inputs or options: starting afresh")
        shutil.rmtree(work)
        return open_work(work, paths, job_options, docs_per_unit, exclude=exclude)
    return [Unit.from_dict(u) for u in manifest["units"]]


def scoring_options(options: ScoreOptions, weights_path: str | None, weights: Weights) -> dict:
    """The manifest's record of what pass 1 computes (a change invalidates the scored units). Embeddings are not
    part of it: a rerun with --semdedup embeds the units that lack them."""
    return {"options": asdict(options), "weights": str(weights_path) if weights_path else None,
            "weights_digest": digest_files([Path(weights_path)]) if weights_path else None,
            "weights_data": weights.provenance.get("data", "uniform")}


def load_manifest(work: Path) -> dict:
    path = work / "manifest.json"
    if not path.is_file():
        raise ValueError(f"{work}: no manifest.json (not a work folder of `prunefusion score`)")
    return json.loads(path.read_text())


def corpus_reasons(metas: list[dict], ids: list[str], scores: np.ndarray, work: Path,
                   merge: MergeOptions) -> tuple[list[list[str]], list[str | None]]:
    """The corpus-level reasons of every document (in unit order: `ids`, `scores`) and, for SemDeDup duplicates,
    the kept id."""
    from prunefusion.quality import semdedup as sd

    extra: list[list[str]] = [[] for _ in ids]
    duplicate_of: list[str | None] = [None] * len(ids)
    if merge.drop_bottom_percent and ids:
        cutoff = np.nanpercentile(scores, merge.drop_bottom_percent)
        for reasons, score in zip(extra, scores, strict=True):
            if score < cutoff:
                reasons.append(BOTTOM_PERCENTILE)
    if merge.long_files and ids:
        keep = sd.long_file_mask([n for m in metas for n in m["lengths"]], merge.long_files)
        for reasons, kept in zip(extra, keep, strict=True):
            if not kept:
                reasons.append("long_file")
    if merge.semdedup is not None and ids:
        missing = [m["unit"] for m in metas if not unit_path(work, m["unit"], ".npy").is_file()]
        if missing:
            raise ValueError(f"{work}: units {missing[:5]} were scored without embeddings: rerun `prunefusion score` "
                             "with --semdedup and this --work (it embeds only those units)")
        vectors = np.concatenate([np.load(unit_path(work, m["unit"], ".npy")) for m in metas])
        result = sd.semdedup(vectors, eps=merge.semdedup)
        for i, kept in enumerate(result.keep):
            if not kept:
                extra[i].append("semdedup_duplicate")
                duplicate_of[i] = ids[int(result.duplicate_of[i])]
    return extra, duplicate_of


@dataclass(frozen=True)
class MergeResult:
    scores: np.ndarray  # every document's Sharma score (NaN without it), in input order
    keep: np.ndarray  # the final decision
    reason_counts: dict[str, int]  # most frequent first
    peak_rss_mb_per_worker: dict[str, float]  # HOST:PID -> the worker's peak resident memory over its units
    units: int

    @property
    def documents(self) -> int:
        return len(self.keep)

    @property
    def kept(self) -> int:
        return int(self.keep.sum())


def merge(work: Path, merge_options: MergeOptions, out: Path, rejected: Path | None) -> MergeResult:
    """Pass 2: kept and rejected files from a work folder whose units are all done."""
    manifest = load_manifest(work)
    indices = [u["index"] for u in manifest["units"]]
    missing = [i for i in indices if not is_done(work, i)]
    if missing:
        raise ValueError(f"{work}: {len(missing)} of {len(indices)} units not scored yet (first: {missing[:5]}); "
                         "run every shard first")
    metas = [json.loads(unit_path(work, i, ".json").read_text()) for i in indices]
    ids = [i for m in metas for i in m["ids"]]
    seen: set[str] = set()
    for doc_id in ids:
        if doc_id in seen:
            raise ValueError(f"document ids must be unique across the inputs: {doc_id!r} appears twice")
        seen.add(doc_id)
    scores = np.array([np.nan if s is None else s for m in metas for s in m["scores"]], dtype=float)
    extra, duplicate_of = corpus_reasons(metas, ids, scores, work, merge_options)
    keeps, counts = _write_outputs(work, indices, extra, duplicate_of, merge_options.keep_text, out, rejected)
    return MergeResult(scores, np.array(keeps, dtype=bool), counts, _peak_per_worker(metas), len(indices))


def _write_outputs(work: Path, indices: list[int], extra: list[list[str]], duplicate_of: list[str | None],
                   keep_text: bool, out: Path, rejected: Path | None) -> tuple[list[bool], dict[str, int]]:
    """Stream the units in order into `out` (kept) and `rejected`, each written under a temporary name and renamed
    once complete; returns every document's decision and the per-reason counts."""
    counts: dict[str, int] = {}
    keeps: list[bool] = []
    targets = [out] + ([rejected] if rejected else [])
    tmp = {t: t.with_name(f"{t.name}.{os.getpid()}.partial") for t in targets}
    with contextlib.ExitStack() as stack:
        handles = {}
        for target, path in tmp.items():
            target.parent.mkdir(parents=True, exist_ok=True)
            handles[target] = stack.enter_context(open(path, "w"))
        for i in indices:
            with open(unit_path(work, i, ".jsonl")) as lines:
                for line in lines:
                    record, quality, rewritten = json.loads(line)
                    position = len(keeps)
                    quality["reasons"] += extra[position]
                    if duplicate_of[position] is not None:
                        quality["duplicate_of"] = duplicate_of[position]
                    keep = quality["keep"] = not quality["reasons"]
                    keeps.append(keep)
                    for reason in quality["reasons"]:
                        counts[reason] = counts.get(reason, 0) + 1
                    if keep and rewritten is not None and not keep_text:
                        record, quality["rewritten"] = {**record, "text": rewritten}, True
                    if (target := out if keep else rejected) is not None:
                        handles[target].write(json.dumps({**record, "quality": quality}) + "\n")
    for target, path in tmp.items():  # renamed only once every line is written: nothing half-written is left
        os.replace(path, target)
    return keeps, dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def _peak_per_worker(metas: list[dict]) -> dict[str, float]:
    peaks: dict[str, float] = {}
    for m in metas:
        peaks[m["worker"]] = max(peaks.get(m["worker"], 0.0), m["peak_rss_mb"])
    return peaks
