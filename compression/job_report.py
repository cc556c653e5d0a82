"""The finished job's manifest.json (machine-readable record) and report.md (the same, for people, with plots)."""

from __future__ import annotations

import hashlib
import json
import platform
import time
from importlib import metadata
from pathlib import Path

from prunefusion.compression.evaluate import rows_table
from prunefusion.compression.records import Distances, JobManifest, Metrics, Source

VERSIONED = ("prunefusion", "torch", "transformers", "tokenizers", "peft", "bitsandbytes", "accelerate",
             "safetensors")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def gap_recovered(original: float, pruned: float, healed: float) -> float | None:
    """The share of the pruning damage healing undid: (pruned - healed) / (pruned - original)."""
    return (pruned - healed) / (pruned - original) if pruned != original else None


def best_blocks(distances: dict) -> list[dict]:
    return [{"n": int(n), **row} for n, row in distances["best_last_token"].items()]


def build_manifest(ctx) -> JobManifest:
    from prunefusion.checkpoints import weights_digest

    measured, pruned, heal = ctx.results["measure"], ctx.results["prune"], ctx.results.get("heal")
    evaluation = ctx.results["evaluate"]
    distances = json.loads((ctx.work / measured.distances).read_text())
    rows = evaluation.by_label()
    final = rows.get("healed", rows["pruned"])
    gap = None
    if "healed" in rows and final.get("held_out_perplexity") is not None:
        gap = gap_recovered(rows["original"]["held_out_perplexity"], rows["pruned"]["held_out_perplexity"],
                            final["held_out_perplexity"])
    job_text = (ctx.work / "job.yaml").read_text()
    return JobManifest(
        name=ctx.spec.name,
        job=ctx.spec.model_dump(),
        job_sha256=hashlib.sha256(job_text.encode()).hexdigest(),
        source=Source(path=str(ctx.spec.model_path), weights_digest=pruned.source_weights_digest,
                      num_layers=pruned.original_num_layers),
        strategy=pruned.strategy,
        removed=pruned.removed,
        kept=pruned.kept,
        distance=pruned.distance,
        distances=Distances(file=measured.distances, samples=distances["samples"],
                            best_last_token=best_blocks(distances)),
        healing=heal,
        metrics=Metrics(held_out_perplexity=final.get("held_out_perplexity"), mean_cosine=final.get("mean_cosine"),
                        evaluation=evaluation.rows, healing_gap_recovered=gap, sets=evaluation.sets),
        num_parameters=final["parameters"],
        weights_digest=weights_digest(ctx.work),
        stage_seconds={stage: r.seconds for stage, r in ctx.results.items()},
        device=ctx.device,
        versions=package_versions(),
        finished_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        data_filter=ctx.results.get("filter"),
    )


def filter_section(result, root: str = "") -> list[str]:
    """The report's "Data filter" section: per set, what was kept, why the rest was not, the score histogram.
    `root`: the job directory relative to the report (figure links), "" beside it."""
    lines = ["## Data filter", "",
             "The quality filter (`prunefusion score`'s methods) ran over this text before tokenization; the kept "
             "documents are in `filter/`.", ""]
    for name in ("calibration", "heal"):
        s = getattr(result, name)
        if s is None:
            continue
        methods = ", ".join(s.config["methods"] or ["sharma", "every rule family"])
        scores = (f"; mean Sharma score {s.mean_score_all:.3f} of all, {s.mean_score_kept:.3f} of the kept"
                  if s.mean_score_all is not None and s.mean_score_kept is not None else "")
        lines += [f"**{name}**: kept **{s.kept} of {s.documents}** documents ({s.kept / s.documents:.0%}), methods "
                  f"{methods}, keep_fraction {s.config['keep_fraction']:g}{scores}; filter config "
                  f"`{s.config_digest[:16]}`, kept text `{s.kept_digest[:16]}`.", "",
                  "| reason | documents |", "|---|---|", *(f"| {r} | {n} |" for r, n in s.reason_counts.items()), ""]
        if s.histogram:
            lines += [f"![{name} scores]({root}{s.histogram})", ""]
    return lines


def healing_section(heal, root: str = "") -> list[str]:
    """The report's "Healing" section: method, settings, loss, the merge check and the loss curve."""
    how = "distillation toward the original's embeddings" if heal.distilled else "next-token loss"
    if heal.method == "full":
        what, merged = "Full fine-tuning", "every weight trained, nothing merged"
    else:
        what = f"{heal.method.upper()}, rank {heal.config['rank']}"
        check = next(v for k, v in heal.merge.items() if k.startswith("max_"))
        merged = f"merged vs adapter max difference {check:.1e}"
    return ["## Healing", "",
            f"{what} ({how}), {heal.step} steps of {heal.config['batch_size']}, learning rate "
            f"{heal.config['learning_rate']:g}; loss {heal.first_loss:.3f} -> {heal.final_loss:.3f} (mean of the "
            f"last 10); {merged}; {heal.seconds:.0f} s.", "",
            f"![healing loss]({root}{heal.loss_curve})", ""]


def evaluation_section(m: JobManifest, heading: str = "## Evaluation") -> list[str]:
    """A table per held-out set (evaluate.data, then evaluate.sets) and the share of the gap healing recovered."""
    lines = [heading, "", "Held-out set `evaluate.data` "
             f"({', '.join(m.job['evaluate']['data']) or 'the stdlib corpus held-out split'}):", "",
             *rows_table(m.metrics.evaluation).splitlines(), ""]
    for name, rows in m.metrics.sets.items():
        lines += [f"Held-out set `{name}` ({', '.join(m.job['evaluate']['sets'][name])}):", "",
                  *rows_table(rows).splitlines(), ""]
    if m.metrics.healing_gap_recovered is not None:
        lines += [f"Healing recovered **{m.metrics.healing_gap_recovered:.0%}** of the perplexity gap "
                  "between the pruned and the original model.", ""]
    return lines


def write_report(ctx, manifest: JobManifest, path: Path) -> None:
    m = manifest
    start, end = m.removed
    lines = [
        f"# Compression job `{m.name}`", "",
        f"Source `{m.source.path}` ({m.source.num_layers} layers, weights `{m.source.weights_digest[:16]}`). "
        f"Removed layers **[{start}, {end})** (0-based, half-open) by the `{m.strategy}` strategy"
        + (f", angular distance {m.distance:.4f}" if m.distance else "") + f"; kept {m.kept}.", "",
        "Rerun: `prunefusion compress run job.yaml --out DIR` (the job file is beside this report).", "",
        "## Angular distances", "",
        f"Measured over {m.distances.samples} calibration samples (last token; `measure/distances.csv` has "
        "every block and the all-token variant).", "",
        "![d(l, n)](measure/distance_heatmap.png)", "", "![best block per size](measure/best_blocks.png)", "",
        "| n | best start l*(n) | d*(n) |", "|---|---|---|",
        *(f"| {b['n']} | {b['start']} | {b['distance']:.4f} |" for b in m.distances.best_last_token), "",
    ]
    if m.data_filter is not None:
        lines += filter_section(m.data_filter)
    if m.healing:
        lines += healing_section(m.healing)
    lines += evaluation_section(m)
    lines += ["## Run", "", "| stage | seconds |", "|---|---|",
              *(f"| {s} | {sec:.1f} |" for s, sec in m.stage_seconds.items()), "",
              "Versions: " + ", ".join(f"{k} {v}" for k, v in m.versions.items() if v) + f"; device {m.device}.",
              ""]
    path.write_text("\n".join(lines))
