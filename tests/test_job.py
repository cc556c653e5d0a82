"""`compress run`: one YAML drives measure -> prune -> heal -> merge -> evaluate; resumable and atomic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from prunefusion.compression.job import load_job, run_job
from prunefusion.compression.records import JobManifest
from prunefusion.model_kinds import CAUSAL_LM

JOBS_DIR = Path(__file__).resolve().parents[1] / "compression" / "jobs"


def write_job(tmp_path: Path, source: Path, texts: Path, **overrides) -> Path:
    job = {"name": "pico-job", "model": str(source),
           "calibration": {"data": [str(texts)], "samples": 16, "seq_len": 64, "batch_size": 4},
           "prune": {"strategy": "angular", "n": 2},
           "heal": {"data": [str(texts)], "steps": 8, "batch_size": 4, "seq_len": 64, "learning_rate": 1e-2,
                    "warmup_steps": 1, "checkpoint_every": 4},
           "evaluate": {"data": [str(texts)]}, **overrides}
    path = tmp_path / f"{job['name']}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from pico import build_pico_llama

    from prunefusion.models.corpus import pydoc_topics

    root = tmp_path_factory.mktemp("job")
    source = build_pico_llama(root / "src", layers=5)
    texts = root / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in pydoc_topics()[:24]))
    return root, source, texts


@pytest.fixture(scope="module")
def finished(setup):
    root, source, texts = setup
    out = root / "out"
    return out, run_job(write_job(root, source, texts), out)


@pytest.mark.slow
def test_a_job_writes_a_servable_checkpoint_with_manifest_and_report(finished, setup):
    from prunefusion.checkpoints import digest_files, weight_files
    from prunefusion.server.engines.hf_loading import load_causal_lm

    out, manifest = finished
    _, source, _ = setup
    distances = json.loads((out / "measure" / "distances.json").read_text())
    start = distances["best_last_token"]["2"]["start"]
    assert manifest.removed == [start, start + 2] and manifest.strategy == "angular"
    assert manifest.source.weights_digest == digest_files(weight_files(source))
    assert manifest.distance == pytest.approx(distances["best_last_token"]["2"]["distance"])
    labels = [row["label"] for row in manifest.metrics.evaluation]
    assert labels == ["original", "pruned", "healed"]
    healed = manifest.metrics.evaluation[2]
    assert healed["num_layers"] == 3 and manifest.metrics.held_out_perplexity == healed["held_out_perplexity"]
    assert manifest.versions["torch"] and manifest.versions["peft"]
    assert json.loads((out / "manifest.json").read_text()) == manifest.to_json()
    assert JobManifest.load(out / "manifest.json") == manifest  # the typed record reads back whole
    assert (out / "job.yaml").read_text().startswith("calibration")  # the job file itself, as given
    # the directory is the healed model, servable as is; intermediates are gone
    loaded = load_causal_lm(out)
    assert loaded.num_layers == 3 and loaded.weights_digest == manifest.weights_digest
    assert not (out / "heal" / "checkpoints").exists() and not list((out / "pruned").glob("*.safetensors"))
    report = (out / "report.md").read_text()
    assert f"[{start}, {start + 2})" in report
    for image in ("measure/distance_heatmap.png", "measure/best_blocks.png", "heal/heal_loss.png"):
        assert f"]({image})" in report and (out / image).stat().st_size > 0
    assert not (out.parent / "out.partial").exists()


@pytest.mark.slow
def test_a_killed_job_resumes_and_only_a_finished_one_is_named_out(setup, finished, tmp_path):
    root, source, texts = setup
    job, out = write_job(tmp_path, source, texts), tmp_path / "out"
    assert run_job(job, out, stop_after="heal") is None  # stopped (as if killed) after healing: no out yet
    assert not out.exists() and (tmp_path / "out.partial" / "stages" / "heal.json").is_file()
    stamps = {s: (tmp_path / "out.partial" / "stages" / f"{s}.json").stat().st_mtime_ns for s in ("measure", "heal")}
    saved_job = tmp_path / "out.partial" / "job.yaml"
    stamps["job.yaml"] = saved_job.stat().st_mtime_ns
    manifest = run_job(job, out)
    for stage, stamp in stamps.items():  # finished stages were not run again, the saved job not rewritten (in place,
        name = stage if stage.endswith(".yaml") else f"stages/{stage}.json"  # a kill mid-copy broke every rerun)
        assert (out / name).stat().st_mtime_ns == stamp
    assert manifest.removed == finished[1].removed
    assert manifest.weights_digest == finished[1].weights_digest  # same job, same seed: same weights
    with pytest.raises(FileExistsError, match="finished job"):
        run_job(job, out)


@pytest.mark.slow
def test_an_unfinished_run_of_another_job_is_not_resumed_by_mistake(setup, tmp_path):
    root, source, texts = setup
    out = tmp_path / "out"
    run_job(write_job(tmp_path, source, texts), out, stop_after="measure")
    other = write_job(tmp_path, source, texts, prune={"strategy": "simple", "n": 1}, heal=None)
    with pytest.raises(ValueError, match="different job"):
        run_job(other, out)
    manifest = run_job(other, out, restart=True)
    assert manifest.removed == [3, 4] and manifest.healing is None
    assert [row["label"] for row in manifest.metrics.evaluation] == ["original", "pruned"]


def test_bad_jobs_are_refused_with_the_field_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: m\nprune: {fraction: 0.25, n: 2}\n")
    with pytest.raises(ValueError, match="exactly one of n, fraction or layers"):
        load_job(bad)
    bad.write_text("name: x\nmodel: m\nprune: {n: 2, strategy: best}\n")
    with pytest.raises(ValueError, match="unknown strategy 'best'"):
        load_job(bad)
    bad.write_text("name: x\nmodel: m\nprune: {n: 2}\nheal: {stpes: 3}\n")
    with pytest.raises(ValueError, match="heal.stpes: Extra inputs are not permitted"):
        load_job(bad)


def test_full_finetune_needs_an_unquantized_base_and_is_reported_as_such(tmp_path):
    from prunefusion.compression.job_report import healing_section
    from prunefusion.compression.records import HealResult
    from prunefusion.model_kinds import ENCODER

    job = tmp_path / "full.yaml"
    job.write_text("name: full\nmodel: m\nprune: {n: 2}\nheal: {full_finetune: true}\n")
    with pytest.raises(ValueError, match="full_finetune.*quantize: false"):  # causal LMs default to QLoRA
        load_job(job).heal.config(CAUSAL_LM, device="cpu")
    cfg = load_job(job).heal.config(ENCODER, device="cpu")  # encoders default to plain LoRA's unquantized base
    assert cfg.full_finetune and cfg.method == "full"
    result = HealResult(steps_run=5, step=5, resumed_from=None, merge={"full_finetune": True, "dtype": "float32"},
                        method=cfg.method, distilled=True, config={"batch_size": 4, "learning_rate": 3e-4},
                        first_loss=0.5, final_loss=0.1, loss_curve="heal/heal_loss.png")
    assert "Full fine-tuning (distillation" in healing_section(result)[2]
    assert "merged vs adapter" not in healing_section(result)[2]


def test_example_jobs_are_valid():
    jobs = sorted(JOBS_DIR.glob("*.yaml"))
    assert jobs
    for path in jobs:
        spec = load_job(path)
        assert "prunefusion compress run" in path.read_text().split("\nname:")[0], f"{path}: no command in header"
        assert spec.name == path.stem


@pytest.mark.slow
def test_an_encoder_job_heals_by_distillation_and_reports_cosine(tmp_path):
    from pico import build_pico_bert

    from prunefusion.models.corpus import sentence_splits

    train, held = sentence_splits()
    train, held = train[:300], held[:60]
    source = build_pico_bert(tmp_path / "bert", train + held)
    texts, held_file = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in train))
    held_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in held))
    job = write_job(tmp_path, source, texts, name="pico-bert", prune={"strategy": "angular-all-tokens", "n": 2},
                    heal={"data": [str(texts)], "steps": 30, "batch_size": 16, "seq_len": 32, "learning_rate": 1e-2,
                          "warmup_steps": 2, "checkpoint_every": 10},
                    evaluate={"data": [str(held_file)]})
    manifest = run_job(job, tmp_path / "out")
    rows = {row["label"]: row for row in manifest.metrics.evaluation}
    assert rows["original"]["mean_cosine"] == pytest.approx(1.0)
    assert rows["pruned"]["mean_cosine"] < rows["healed"]["mean_cosine"] < 1.0  # distillation closed part of the gap
    assert manifest.metrics.mean_cosine == rows["healed"]["mean_cosine"]
    assert manifest.healing.distilled and manifest.healing.method == "lora"  # encoders: plain LoRA
    assert rows["healed"]["num_layers"] == 2 and "mean cosine" in (tmp_path / "out" / "report.md").read_text()
    with pytest.raises(ValueError, match="token_weight"):
        bad = write_job(tmp_path, source, texts, name="lm-heal", heal={"token_weight": 1.0})
        from prunefusion.compression.job import load_job

        load_job(bad).heal.config(CAUSAL_LM, device="cpu")


def test_compress_evaluate_prints_one_table_for_lms_and_encoders(tmp_path, capsys, pico_dir):
    from pico import build_pico_bert

    from prunefusion.cli import main
    from prunefusion.models.corpus import sentence_splits

    train, held = sentence_splits()
    held_file = tmp_path / "held.jsonl"
    held_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in held[:24]))
    bert = build_pico_bert(tmp_path / "bert", train[:100] + held[:24])
    cases = {"lm": ([str(pico_dir), str(pico_dir)], "held out perplexity", "decode tokens per s"),
             "encoder": ([str(bert), str(bert)], "mean cosine", "sentences per s")}
    for name, (models, quality, speed) in cases.items():
        assert main(["compress", "evaluate", *models, "--data", str(held_file), "--out", str(tmp_path / name)]) == 0
        table = capsys.readouterr().out
        assert quality in table and speed in table and "x) |" in table  # speed with its ratio to the first model
        rows = json.loads((tmp_path / name / "evaluation.json").read_text())
        assert [r["label"] for r in rows] == models
        if name == "encoder":
            assert [r["mean_cosine"] for r in rows] == pytest.approx([1.0, 1.0])
        else:
            assert rows[0]["held_out_perplexity"] == pytest.approx(rows[1]["held_out_perplexity"])
