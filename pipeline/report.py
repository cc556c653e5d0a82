"""The pipeline's one report: report.md, and report.html made from it (python-markdown), figures beside it.

What it holds, pruned beside original, each figure with its numbers under it: the headline table (layers,
parameters, quality, throughput and latency per load), the angular-distance heatmap and best block per size, the
healing data filter's score histogram and reasons, the healing loss curve, the quality table, the latency CDFs and
the throughput-vs-concurrency plot, and how long each stage took. The figures are the stages' own PNG files, linked
by relative path (model/..., loadtest/...), so the directory can be moved or served as a whole.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from prunefusion.atomic import write_text_atomic
from prunefusion.compression.job_report import evaluation_section, filter_section
from prunefusion.compression.job_report import healing_section as job_healing_section

QUALITY_COLUMNS = {"held_out_perplexity": "held-out perplexity (lower is better)",
                   "mean_cosine": "mean cosine to the original's embeddings", "mc_accuracy": "multiple-choice accuracy"}

# Marks every <img> once the page has loaded: data-loaded="ok" or "failed"; a failed figure gets a visible banner,
# for a reader and for the headless-browser check (pipeline/browser.py), which reads the attributes back.
FIGURE_CHECK = """<script>
window.addEventListener("load", () => {
  const failed = [];
  for (const img of document.images) {
    const ok = img.complete && img.naturalWidth > 0;
    img.dataset.loaded = ok ? "ok" : "failed";
    if (!ok) failed.push(img.getAttribute("src"));
  }
  if (failed.length) {
    const banner = document.createElement("p");
    banner.id = "figures-failed";
    banner.textContent = failed.length + " figure(s) failed to load: " + failed.join(", ");
    document.body.prepend(banner);
  }
  document.body.dataset.figures = document.images.length + " figures, " + failed.length + " failed";
});
</script>"""

STYLE = """<style>
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; }
code { background: #f4f4f4; padding: 0 0.2em; }
#figures-failed { background: #fdd; border: 1px solid #c00; padding: 0.5em; }
</style>"""


def _figure(path: str, alt: str) -> list[str]:
    return [f"![{alt}]({path})", ""]


def _number(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def headline(manifest, loadtest: dict | None) -> list[str]:
    rows = {r["label"]: r for r in manifest.metrics.evaluation}
    original, final = rows["original"], rows.get("healed", rows["pruned"])
    lines = ["| | original | pruned | pruned / original |", "|---|---|---|---|",
             f"| layers | {original['num_layers']} | {final['num_layers']} | "
             f"{final['num_layers'] / original['num_layers']:.2f} |",
             f"| parameters | {original['parameters']:,} | {final['parameters']:,} | "
             f"{final['parameters'] / original['parameters']:.2f} |"]
    for name, set_rows in {"": manifest.metrics.evaluation, **manifest.metrics.sets}.items():
        by_label = {r["label"]: r for r in set_rows}
        first, last = by_label["original"], by_label.get("healed", by_label["pruned"])
        for key, label in QUALITY_COLUMNS.items():
            if last.get(key) is not None:
                lines.append(f"| {label}{f' ({name})' if name else ''} | {_number(first.get(key), 4)} | "
                             f"{_number(last[key], 4)} | {_ratio(last[key], first.get(key))} |")
    for load, (a, b) in served_pairs(loadtest).items():
        speed_a, speed_b = a["output_tokens_per_s"], b["output_tokens_per_s"]
        lines.append(f"| throughput at {load} ({loadtest['unit']}) | {_number(speed_a)} | {_number(speed_b)} | "
                     f"**{_ratio(speed_b, speed_a)}** |")
        lines.append(f"| e2e latency p50 at {load} (ms) | {_number(a['e2e_p50_ms'])} | {_number(b['e2e_p50_ms'])} | "
                     f"{_ratio(b['e2e_p50_ms'], a['e2e_p50_ms'])} |")
    return lines + [""]


def served_pairs(loadtest: dict | None) -> dict[str, tuple[dict, dict]]:
    """load label -> (original's row, pruned's row) of the load test's results."""
    if loadtest is None:
        return {}
    from prunefusion.pipeline.run import ORIGINAL, RESULT

    by = {(r["model"], r["load"]): r for r in loadtest["rows"]}
    loads = dict.fromkeys(r["load"] for r in loadtest["rows"])
    return {load: (by[(ORIGINAL, load)], by[(RESULT, load)]) for load in loads}


def distances_section(m) -> list[str]:
    start, end = m.removed
    return ["## Which layers were removed", "",
            f"Angular distance between the input of layer l and of layer l + n, over {m.distances.samples} "
            f"calibration samples (last token). The `{m.strategy}` strategy removed layers **[{start}, {end})** "
            f"(0-based, half-open)" + (f", distance {m.distance:.4f}" if m.distance else "") + ".", "",
            *_figure("model/measure/distance_heatmap.png", "angular distance d(l, n)"),
            *_figure("model/measure/best_blocks.png", "best block per size"),
            "| block size n | best first layer l*(n) | d*(n) |", "|---|---|---|",
            *(f"| {b['n']} | {b['start']} | {b['distance']:.4f} |" for b in m.distances.best_last_token), ""]


def healing_section(m) -> list[str]:
    if m.healing is None:
        return ["## Healing", "", "The job does not heal (`heal: null`): the result is the pruned model.", ""]
    return job_healing_section(m.healing, "model/")


def serving_section(loadtest: dict | None, skipped: str | None) -> list[str]:
    from prunefusion.loadtest.run import results_table

    if loadtest is None:
        return ["## Serving", "", f"Not load-tested: {skipped}", ""]
    lines = ["## Serving", "", loadtest["summary"], "", *_figure("loadtest/latency_cdf.png", "latency CDFs"),
             "| model | load | requests | TTFT p50 / p90 / p99 ms | e2e p50 / p90 / p99 ms |", "|---|---|---|---|---|"]
    for r in loadtest["rows"]:
        ttft = " / ".join(_number(r.get(f"ttft_p{q}_ms")) for q in (50, 90, 99))
        e2e = " / ".join(_number(r.get(f"e2e_p{q}_ms")) for q in (50, 90, 99))
        lines.append(f"| {r['model']} | {r['load']} | {r['requests']} | {ttft} | {e2e} |")
    lines += ["", *_figure("loadtest/scaling.png", "throughput and e2e p99 against concurrency"),
              f"| load | original {loadtest['unit']} | pruned {loadtest['unit']} | pruned / original | per round |",
              "|---|---|---|---|---|"]
    for load, (a, b) in served_pairs(loadtest).items():
        rounds = " / ".join(_ratio(y, x) for x, y in zip(a["throughput_by_round"], b["throughput_by_round"],
                                                          strict=True))
        lines.append(f"| {load} | {_number(a['output_tokens_per_s'])} | {_number(b['output_tokens_per_s'])} | "
                     f"{_ratio(b['output_tokens_per_s'], a['output_tokens_per_s'])} | {rounds} |")
    lines += ["", "Every row of the load test (`loadtest/report.md`, `loadtest/results.csv`):", "",
              *results_table(loadtest["rows"], loadtest["layers"], list(dict.fromkeys(r["model"]
                                                                                    for r in loadtest["rows"]))), ""]
    return lines


def run_section(p, m) -> list[str]:
    return ["## Run", "", "| compression stage | seconds |", "|---|---|",
            *(f"| {s} | {sec:.1f} |" for s, sec in m.stage_seconds.items()), "",
            "| pipeline stage | this run | seconds (when it last ran) |", "|---|---|---|",
            *(f"| {s} | {p.ran.get(s, '-')} | {_number(p.seconds.get(s))} |" for s in ("compress", "loadtest")),
            "", "Versions: " + ", ".join(f"{k} {v}" for k, v in m.versions.items() if v) + f"; device {m.device}.", ""]


def load_results(p) -> tuple[dict | None, str | None]:
    """(the load test's results with its summary and unit, or None with why)."""
    results = p.loadtest_dir / "results.json"
    if not results.is_file():
        return None, "the loadtest stage has not run"
    data = json.loads(results.read_text())
    report = (p.loadtest_dir / "report.md").read_text().split("\n\n")
    data["summary"] = report[1] if len(report) > 1 else ""
    data["unit"] = "texts/s" if p.kind_name() == "encoder" else "tok/s"
    return data, None


def markdown_report(p) -> str:
    m = p.manifest()
    loadtest, skipped = load_results(p)
    lines = [f"# `{m.name}`: {Path(m.source.path).name} pruned, healed, served and load-tested", "",
             f"Source `{m.source.path}` ({m.source.num_layers} layers); result `model/` ({len(m.kept)} layers, "
             f"weights `{m.weights_digest[:16]}`). Rerun: `prunefusion pipeline job.yaml --out DIR` (stages whose "
             "output is current are skipped).", "", *headline(m, loadtest), *distances_section(m)]
    if m.data_filter is not None:
        lines += filter_section(m.data_filter, "model/")
    lines += [*healing_section(m), *evaluation_section(m, "## Quality"), *serving_section(loadtest, skipped),
              *run_section(p, m)]
    return "\n".join(lines)


def html_page(markdown_text: str, title: str) -> str:
    import markdown

    body = markdown.markdown(markdown_text, extensions=["tables"], output_format="html")
    return (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"{STYLE}</head>\n<body>\n{body}\n{FIGURE_CHECK}\n</body></html>\n")


def write_report(p) -> None:
    text = markdown_report(p)
    write_text_atomic(p.out / "report.md", text)
    write_text_atomic(p.out / "report.html", html_page(text, f"{p.spec.name}: pipeline report"))
    if not (p.out / "job.yaml").is_file() or (p.out / "job.yaml").read_bytes() != Path(p.job_path).read_bytes():
        write_text_atomic(p.out / "job.yaml", Path(p.job_path).read_text())
