"""`prunefusion pipeline`: job -> compressed model -> both served -> load test -> one report, checked in Chromium."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from prunefusion.pipeline.browser import browser, render

LOADTEST = {"concurrency": [1, 2], "duration_s": 3, "warmup_s": 0.5, "rounds": 2, "prompt_words": 8,
            "max_new_tokens": 8, "max_batch_size": 4}
FIGURES = {"model/measure/distance_heatmap.png", "model/measure/best_blocks.png", "model/heal/heal_loss.png",
           "loadtest/latency_cdf.png", "loadtest/scaling.png"}


def needs_browser() -> None:
    if browser() is None:
        if os.environ.get("CI"):
            pytest.fail("CI must have Chromium (.ci/run installs Debian's chromium)")
        pytest.skip("no headless Chromium here (apt-get install chromium)")


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    from pico import build_pico_llama
    from test_job import write_job

    from prunefusion.cli import main
    from prunefusion.models.corpus import pydoc_topics

    needs_browser()
    root = tmp_path_factory.mktemp("pipeline")
    source = build_pico_llama(root / "src", layers=5)
    texts = root / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in pydoc_topics()[:24]))
    other = root / "other.jsonl"
    other.write_text("".join(json.dumps({"text": t}) + "\n" for t in pydoc_topics()[24:32]))
    job = write_job(root, source, texts, loadtest=LOADTEST,
                    evaluate={"data": [str(texts)], "sets": {"other_text": [str(other)]}})
    out = root / "out"
    assert main(["pipeline", str(job), "--out", str(out), "--screenshot"]) == 0
    return root, job, out


@pytest.mark.slow
def test_the_pipeline_serves_both_models_and_reports_every_figure(pipeline_run):
    from prunefusion.compression.records import JobManifest

    _, _, out = pipeline_run
    manifest = JobManifest.load(out / "model" / "manifest.json")
    assert manifest.removed[1] - manifest.removed[0] == 2
    served = yaml.safe_load((out / "serve.yaml").read_text())["models"]
    assert [(m["name"], Path(m["path"]).resolve()) for m in served] == [
        ("original", Path(manifest.source.path).resolve()), ("pruned", (out / "model").resolve())]
    results = json.loads((out / "loadtest" / "results.json").read_text())
    rows = {(r["model"], r["load"]): r for r in results["rows"]}
    assert set(rows) == {(m, c) for m in ("original", "pruned") for c in ("c=1", "c=2")}
    assert all(r["ok"] > 0 and r["errors"] == 0 for r in rows.values())
    assert results["layers"] == {"original": 5, "pruned": 3}  # the server loaded the pruned model, not a copy
    assert all(len(r["throughput_by_round"]) == 2 for r in rows.values())

    # the report's numbers are the stages' own
    report = (out / "report.md").read_text()
    a, b = rows[("original", "c=2")], rows[("pruned", "c=2")]
    ratio = b["output_tokens_per_s"] / a["output_tokens_per_s"]
    assert f"| throughput at c=2 (tok/s) | {a['output_tokens_per_s']:,.1f} | {b['output_tokens_per_s']:,.1f} | " \
           f"**{ratio:.2f}x** |" in report
    healed = manifest.metrics.evaluation[2]["held_out_perplexity"]
    assert f"{healed:,.4f}" in report and f"| {manifest.removed[0]} |" in report
    # the second held-out set (evaluate.sets): its own rows, in the headline and as a table of its own
    other = {r["label"]: r for r in manifest.metrics.sets["other_text"]}
    assert list(other) == ["original", "pruned", "healed"] and other["healed"]["held_out_perplexity"] != healed
    assert (f"| held-out perplexity (lower is better) (other_text) | {other['original']['held_out_perplexity']:,.4f} | "
            f"{other['healed']['held_out_perplexity']:,.4f} |") in report
    assert "Held-out set `other_text`" in report

    # in a real browser: every figure decoded, and a screenshot that is not blank
    page = render(out / "report.html")
    assert page.failed == [] and set(page.loaded) == FIGURES
    assert f'data-figures="{len(FIGURES)} figures, 0 failed"' in page.dom
    from PIL import Image

    with Image.open(out / "report.png") as shot:
        assert shot.size == (1280, 9000)
        top = shot.convert("RGB").crop((0, 0, 1280, 3000))
        assert len(top.getcolors(1 << 20) or []) > 200  # text, tables and plots, not an empty page


@pytest.mark.slow
def test_a_rerun_skips_current_stages_and_a_loadtest_change_reruns_only_it(pipeline_run, capsys):
    from prunefusion.cli import main
    from prunefusion.pipeline.run import Pipeline, compress_current, loadtest_current

    root, job, out = pipeline_run
    weights = sorted((out / "model").glob("*.safetensors"))
    stamps = [p.stat().st_mtime_ns for p in weights] + [(out / "loadtest" / "results.json").stat().st_mtime_ns]
    assert main(["pipeline", str(job), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "stage compress: current, skipped" in printed and "stage loadtest: current, skipped" in printed
    assert [p.stat().st_mtime_ns for p in weights] + [(out / "loadtest" / "results.json").stat().st_mtime_ns] == stamps

    changed = root / "changed.yaml"
    spec = yaml.safe_load(job.read_text())
    changed.write_text(yaml.safe_dump({**spec, "loadtest": {**LOADTEST, "concurrency": [1]}}))
    p = Pipeline(changed, out)
    assert compress_current(p) and not loadtest_current(p)
    heal_changed = root / "heal-changed.yaml"
    heal_changed.write_text(yaml.safe_dump({**spec, "heal": {**spec["heal"], "steps": 9}}))
    assert not compress_current(Pipeline(heal_changed, out))
    source_weights = next(Path(p.spec.model_path).glob("*.safetensors"))
    original = source_weights.read_bytes()
    try:  # the same job over a source whose weights changed (rebuilt): the compression is not current
        source_weights.write_bytes(original + b" ")
        assert not compress_current(Pipeline(job, out))
    finally:
        source_weights.write_bytes(original)
    assert compress_current(Pipeline(job, out))


@pytest.mark.slow
def test_a_missing_figure_is_reported_by_the_browser_check(pipeline_run, tmp_path):
    _, _, out = pipeline_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("*.safetensors", "records"))
    (copy / "loadtest" / "scaling.png").unlink()
    page = render(copy / "report.html")
    assert page.failed == ["loadtest/scaling.png"] and len(page.loaded) == len(FIGURES) - 1
    assert 'id="figures-failed"' in page.dom and "1 figure(s) failed to load" in page.dom


@pytest.mark.slow
def test_an_encoder_pipeline_load_tests_the_embeddings_service(tmp_path):
    from pico import build_pico_bert
    from test_job import write_job

    from prunefusion.models.corpus import sentence_splits
    from prunefusion.pipeline.run import Pipeline, run_pipeline

    needs_browser()
    train, held = sentence_splits()
    train, held = train[:200], held[:40]
    source = build_pico_bert(tmp_path / "bert", train + held)
    texts, held_file = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in train))
    held_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in held))
    job = write_job(tmp_path, source, texts, name="pico-bert", prune={"strategy": "angular-all-tokens", "n": 2},
                    heal={"data": [str(texts)], "steps": 6, "batch_size": 8, "seq_len": 32, "warmup_steps": 1},
                    evaluate={"data": [str(held_file)]},
                    loadtest={**LOADTEST, "concurrency": [2], "rounds": 1, "texts_per_request": 4})
    out = tmp_path / "out"
    run_pipeline(Pipeline(job, out))
    results = json.loads((out / "loadtest" / "results.json").read_text())
    assert [(r["model"], r["load"]) for r in results["rows"]] == [("original", "c=2"), ("pruned", "c=2")]
    assert results["layers"] == {"original": 4, "pruned": 2}
    records = [json.loads(line) for line in (out / "loadtest" / "records" / "pruned-c2.jsonl").read_text().splitlines()]
    assert {r["rpc"] for r in records} == {"Embed"} and {r["tokens"] for r in records if r["status"] == "OK"} == {4}
    report = (out / "report.md").read_text()
    assert "| mean cosine to the original's embeddings |" in report and "(texts/s)" in report
    page = render(out / "report.html")
    assert page.failed == [] and "loadtest/scaling.png" in page.loaded


def test_a_changed_loadtest_section_resumes_an_unfinished_compression_run(tmp_path):
    from pico import build_pico_llama
    from test_job import write_job

    from prunefusion.compression.job import run_job
    from prunefusion.models.corpus import pydoc_topics

    source = build_pico_llama(tmp_path / "src", layers=4)
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in pydoc_topics()[:8]))
    out = tmp_path / "out"
    assert run_job(write_job(tmp_path, source, texts, loadtest=LOADTEST), out, stop_after="measure") is None
    other = write_job(tmp_path, source, texts, name="pico-job", loadtest={**LOADTEST, "rounds": 3})
    assert run_job(other, out, stop_after="measure") is None  # resumed: measure was done, nothing to redo
    with pytest.raises(ValueError, match="different job"):
        run_job(write_job(tmp_path, source, texts, prune={"strategy": "angular", "n": 1}), out, stop_after="measure")
