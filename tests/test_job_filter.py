"""A compression job's healing / calibration text through the quality filter (`filter:`), as its own stage."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from prunefusion.compression.data_filter import KEEP_FRACTION, FilterSpec, kept_indices
from prunefusion.compression.job import Context, load_job, run_job
from prunefusion.compression.records import FilterResult, JobManifest, from_json
from tests.test_job import write_job

JUNK = [
    "BUY NOW!!! $$$ click here >>> http://x.example <<< $$$ !!!\n" * 6,
    "#### ---- #### ---- ####\n|||| ++++ |||| ++++\n" * 8,
    "lorem lorem lorem lorem lorem lorem lorem lorem lorem lorem",
    "a\nb\nc\nd\ne\nf\ng\nh\ni\nj\nk\nl\nm\nn\no\np",
]


def test_kept_indices_by_hand():
    scores = np.array([0.9, 0.1, 0.5, np.nan, 0.7, 0.3])
    passed = np.array([True, True, False, True, True, True])
    assert kept_indices(scores, passed, 1.0).tolist() == [0, 1, 3, 4, 5]  # every document that passed
    # at most floor(0.5 x 6) = 3 of those that passed, by score: 0.9 (0), 0.7 (4), 0.3 (5); unscored ranks last
    assert kept_indices(scores, passed, 0.5).tolist() == [0, 4, 5]
    assert kept_indices(scores, passed, 0.34).tolist() == [0, 4]  # floor(2.04) = 2
    assert kept_indices(scores, np.zeros(6, dtype=bool), 0.5).tolist() == []


def test_bad_filters_are_refused_when_the_job_loads_naming_the_field(tmp_path):
    for bad, message in (({"methods": ["sharma", "nonsense"]}, "unknown method 'nonsense'"),
                         ({"keep_fraction": 0}, "heal.filter.keep_fraction"),
                         ({"thresholds": {"gopher_quality": 3}}, "FAMILY.NAME"),
                         ({"methods": ["gopher_quality"], "keep_fraction": 0.5}, "needs the 'sharma' method")):
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump({"name": "bad", "model": "x", "prune": {"n": 1}, "heal": {"filter": bad}}))
        with pytest.raises(ValueError, match=message):
            load_job(path)


@pytest.mark.slow
def test_the_filter_stage_drops_junk_keeps_the_best_and_the_heal_reads_what_it_kept(tmp_path):
    from pico import build_pico_llama

    from prunefusion.models.corpus import pydoc_topics

    source = build_pico_llama(tmp_path / "src", layers=5)
    good = pydoc_topics()[:20]
    texts = tmp_path / "mixed.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in [*good[:10], *JUNK, *good[10:]]))
    spec = {"methods": ["sharma", "gopher_repetition"], "keep_fraction": 0.4}  # code-heavy docs: no alpha rule
    job = write_job(tmp_path, source, texts, heal={**yaml.safe_load(write_job(tmp_path, source, texts).read_text())
                                                   ["heal"], "filter": spec})
    out = tmp_path / "out"
    assert run_job(job, out, stop_after="filter") is None
    work = tmp_path / "out.partial"
    stage = json.loads((work / "stages" / "filter.json").read_text())
    heal = stage["heal"]
    assert stage["calibration"] is None  # only the healing text was filtered
    kept = [json.loads(line)["text"] for line in (work / "filter" / "heal.jsonl").read_text().splitlines()]
    assert heal["documents"] == 24 and heal["kept"] == len(kept) == 9  # floor(0.4 x 24)
    assert not set(JUNK) & set(kept)  # the rules and the score drop every junk document ...
    assert set(kept) <= set(good)  # ... and the kept ones come in input order, unchanged
    assert kept == [t for t in [*good[:10], *JUNK, *good[10:]] if t in kept]
    assert heal["reason_counts"].get(KEEP_FRACTION, 0) > 0  # some that passed fell below the best 40%
    assert heal["config_digest"] == FilterSpec(**spec).digest() and (work / heal["histogram"]).stat().st_size > 0

    # what the measure and heal stages read: the kept text for the filtered set, the whole file for the other
    ctx = Context(load_job(job), work, "cpu", {"filter": from_json(FilterResult, stage)})
    assert ctx.source_texts("heal") == kept
    assert ctx.source_texts("calibration") == [*good[:10], *JUNK, *good[10:]]

    manifest = run_job(job, out)  # resumes after the filter stage: heal, merge, evaluate
    assert isinstance(manifest, JobManifest) and manifest.data_filter.heal.kept == 9
    assert manifest.data_filter.heal.kept_digest == heal["kept_digest"]
    assert JobManifest.load(out / "manifest.json") == manifest
    report = (out / "report.md").read_text()
    assert "## Data filter" in report and "kept **9 of 24**" in report and f"| {KEEP_FRACTION} |" in report
    assert f"]({heal['histogram']})" in report and (out / heal["histogram"]).is_file()
