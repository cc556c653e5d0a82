"""Corpus-scale scoring: units planned and read like the obvious whole-file reading, shards + merge == one run, a killed
run resumes without rescoring, and the Ray executor writes exactly what the local executor writes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_quality_server import CLEAN, JUNK

from prunefusion.cli import main
from prunefusion.quality.corpus_sources import plan_units, read_unit
from prunefusion.quality.mixed_corpus import mixed_corpus, with_near_duplicates
from prunefusion.quality.pipeline import ScoreOptions, score_batch
from prunefusion.quality.sharma import load_weights


def _inputs(tmp_path: Path) -> tuple[list[Path], list[dict]]:
    """A JSONL file (blank lines, CRLF, ids on some lines, a raw U+2028 inside a string), a Parquet file of several row
    groups, a `datasets` folder and a text file; with every record as the obvious whole-file reading gives it."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = tmp_path / "a.jsonl"
    rows = [{"id": "x1", "text": CLEAN}, {"text": JUNK, "source": "web"}, {"text": "Line\u2028separator inside."},
            {"id": 7, "text": CLEAN[:90]}]
    jsonl.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\r\n"
                     + json.dumps(rows[2], ensure_ascii=False) + "\n   \n" + json.dumps(rows[3]) + "\n")
    expected = []
    for number, line in enumerate(jsonl.read_text().split("\n"), 1):
        if line.strip():
            record = json.loads(line)
            expected.append({**record, "id": str(record.get("id", f"{jsonl}:{number}"))})
    parquet = tmp_path / "b.parquet"
    table = pa.table({"text": [f"Document number {i}. " + CLEAN[: 40 + i] for i in range(10)],
                      "lang": ["en"] * 10})
    pq.write_table(table, parquet, row_group_size=4)
    expected += [{**r, "id": f"{parquet}:{i + 1}"} for i, r in enumerate(pq.read_table(parquet).to_pylist())]
    hf = tmp_path / "hf"
    datasets.Dataset.from_dict({"text": [JUNK[: 30 + i] for i in range(5)]}).save_to_disk(str(hf))
    arrow = hf / json.loads((hf / "state.json").read_text())["_data_files"][0]["filename"]
    expected += [{**r, "id": f"{arrow}:{i + 1}"} for i, r in enumerate(datasets.load_from_disk(str(hf)))]
    page = tmp_path / "page.txt"
    page.write_text(CLEAN)
    expected.append({"id": str(page), "text": CLEAN})
    return [jsonl, parquet, hf, page], expected


def test_units_read_every_document_once_in_order_as_whole_files_read(tmp_path):
    paths, expected = _inputs(tmp_path)
    for per_unit in (1, 3, 4, 7, 1000):
        units = plan_units(paths, per_unit)
        assert all(u.documents <= per_unit for u in units) and [u.index for u in units] == list(range(len(units)))
        records = [r for u in units for r in read_unit(u)]
        assert records == expected, per_unit
        assert [u.documents for u in units] == [len(read_unit(u)) for u in units]
    assert len(plan_units(paths, 1000)) == 1  # small segments pack into one unit
    corpus = tmp_path / "corpus"  # a plain folder: its corpus files, sorted, recursively
    (corpus / "sub").mkdir(parents=True)
    for name in ("b.jsonl", "sub/a.txt", "notes.csv"):
        (corpus / name).write_bytes(paths[0].read_bytes() if name.endswith(".jsonl") else b"A plain page.")
    ids = [r["id"] for u in plan_units([corpus], 3) for r in read_unit(u)]
    assert ids == ["x1", f"{corpus}/b.jsonl:3", f"{corpus}/b.jsonl:4", "7", f"{corpus}/sub/a.txt"]


def test_bad_records_name_where_and_what(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": 3}) + "\n")
    assert main(["score", str(bad), "--out", str(tmp_path / "k.jsonl"), "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2" in err and "'text' must be a string" in err
    assert (tmp_path / "k.jsonl.work" / "manifest.json").is_file()  # the default work folder stays for a rerun
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": "fixed"}) + "\n")
    assert main(["score", str(bad), "--out", str(tmp_path / "k.jsonl"), "--workers", "0"]) == 0  # fixed: runs
    assert "starting afresh" in capsys.readouterr().out and len((tmp_path / "k.jsonl").read_text().splitlines()) <= 2
    folder = tmp_path / "plain"
    (folder / ".hidden").mkdir(parents=True)
    (folder / ".hidden" / "x.jsonl").write_text(json.dumps({"text": CLEAN}) + "\n")
    assert main(["score", str(folder), "--out", str(tmp_path / "k.jsonl"), "--workers", "0"]) == 2
    assert "no corpus files in it" in capsys.readouterr().err
    assert main(["score", str(bad), "--shard", "0/2", "--workers", "0"]) == 2
    assert "--shard needs --work" in capsys.readouterr().err
    assert main(["score", str(bad), "--shard", "2/2", "--work", str(tmp_path / "w")]) == 2
    assert "RANK must be in [0, WORLD)" in capsys.readouterr().err
    assert main(["score", str(bad), "--shard", "0/2", "--work", str(tmp_path / "w"), "--out", "x.jsonl"]) == 2
    assert "--out: options of `prunefusion score merge`" in capsys.readouterr().err


def test_parquet_and_datasets_folders_through_the_cli(tmp_path):
    import datetime

    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tmp_path / "p.parquet"
    day = datetime.date(2026, 12, 2)
    pq.write_table(pa.table({"text": [CLEAN, JUNK], "day": [day, day]}), parquet)  # a date: not a JSON type
    hf = tmp_path / "hf"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"id": ["t"], "text": [CLEAN]}),
                          "test": datasets.Dataset.from_dict({"id": ["u"], "text": [JUNK]})}).save_to_disk(str(hf))
    out, rejected = tmp_path / "kept.jsonl", tmp_path / "rejected.jsonl"
    assert main(["score", str(parquet), str(hf), "--out", str(out), "--rejected", str(rejected), "--workers", "0",
                 "--keep-text"]) == 0
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    dropped = [json.loads(line) for line in rejected.read_text().splitlines()]
    assert [r["id"] for r in kept] == [f"{parquet}:1", "t"] and [r["id"] for r in dropped] == [f"{parquet}:2", "u"]
    assert kept[0]["day"] == "2026-12-02" and kept[0]["text"] == CLEAN


def _corpus(tmp_path: Path, n: int, seed: int) -> Path:
    docs = with_near_duplicates(mixed_corpus(n, seed=seed), fraction=0.15, seed=seed)
    data = tmp_path / f"corpus-{seed}.jsonl"
    data.write_text("".join(json.dumps({"id": f"d{i}", "text": d.text, "kind": d.kind}) + "\n"
                            for i, d in enumerate(docs)))
    return data


def _outputs(folder: Path) -> tuple[bytes, bytes]:
    return (folder / "kept.jsonl").read_bytes(), (folder / "rejected.jsonl").read_bytes()


CORPUS_DECISIONS = ["--drop-bottom-percent", "15", "--long-files", "5"]


def test_shards_then_merge_write_what_one_run_writes(tmp_path, capsys):
    data = _corpus(tmp_path, 60, seed=4)
    one, merged, work = tmp_path / "one", tmp_path / "merged", tmp_path / "work"
    common = ["--workers", "0", "--batch-size", "7"]
    assert main(["score", str(data), "--out", str(one / "kept.jsonl"), "--rejected", str(one / "rejected.jsonl"),
                 *common, *CORPUS_DECISIONS]) == 0
    assert not (one / "kept.jsonl.work").exists()  # the default work folder goes once the run has succeeded
    for rank in (2, 0):
        assert main(["score", str(data), "--shard", f"{rank}/3", "--work", str(work), *common]) == 0
    merge = ["score", "merge", "--work", str(work), "--out", str(merged / "kept.jsonl"),
             "--rejected", str(merged / "rejected.jsonl"), "--report", str(merged / "report"), *CORPUS_DECISIONS]
    assert main(merge) == 2 and "units not scored yet" in capsys.readouterr().err
    assert not (merged / "kept.jsonl").exists()
    assert main(["score", str(data), "--shard", "1/3", "--work", str(work), *common]) == 0
    assert main(merge) == 0
    assert _outputs(merged) == _outputs(one)
    kept, rejected = (list(map(json.loads, b.decode().splitlines())) for b in _outputs(one))
    assert len(kept) + len(rejected) == 69
    summary = json.loads((merged / "report" / "summary.json").read_text())
    assert summary["documents"] == 69 and summary["kept"] == len(kept) and summary["units"] == 10
    # the corpus-level decisions are those over the whole corpus at once, not per unit of 7
    records = [json.loads(line) for line in data.read_text().splitlines()]
    whole = score_batch([(r["id"], r["text"]) for r in records], ScoreOptions(), load_weights(None)).results
    cutoff = np.nanpercentile([r.score for r in whole], 15)
    longest = sorted(records, key=lambda r: len(r["text"]))[-3:]  # 5% of 69 documents: 3
    reasons = {doc["id"]: doc["quality"]["reasons"] for doc in rejected}
    assert {i for i, rs in reasons.items() if "sharma_bottom_percentile" in rs} == {
        r.id for r in whole if r.score < cutoff}
    assert {i for i, rs in reasons.items() if "long_file" in rs} == {r["id"] for r in longest}
    assert {i for i, rs in reasons.items() if set(rs) - {"sharma_bottom_percentile", "long_file"}} == {
        r.id for r in whole if r.reasons}
    # the merge's options can change without rescoring: every unit is resumed
    assert main(["score", str(data), "--out", str(merged / "kept.jsonl"), "--work", str(work), "--report",
                 str(merged / "report"), *common, "--long-files", "20"]) == 0
    summary = json.loads((merged / "report" / "summary.json").read_text())
    assert summary["units_resumed"] == 10 and summary["reason_counts"]["long_file"] == 13
    # another run's options in the same work folder are refused, not mixed in
    assert main(["score", str(data), "--shard", "0/3", "--work", str(work), "--workers", "0", "--batch-size", "8"]) == 2
    assert "holds a run of other inputs or scoring options" in capsys.readouterr().err


@pytest.mark.slow
def test_a_killed_run_resumes_without_rescoring_or_duplicating(tmp_path):
    data = _corpus(tmp_path, 1500, seed=9)
    work, out = tmp_path / "work", tmp_path / "resumed"
    command = [str(Path(sys.executable).parent / "prunefusion"), "score", str(data), "--out", str(out / "kept.jsonl"),
               "--rejected", str(out / "rejected.jsonl"), "--workers", "0", "--batch-size", "25", "--work", str(work),
               "--report", str(out / "report"), *CORPUS_DECISIONS]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list((work / "units").glob("*.json"))) < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = {p.stem for p in (work / "units").glob("u*.json")}  # a unit is done once its summary is in place
    done = {p: p.stat().st_mtime_ns for p in (work / "units").glob("u*") if p.stem in finished}
    units = len(json.loads((work / "manifest.json").read_text())["units"])
    assert 5 <= len(finished) < units  # killed part way
    assert not (out / "kept.jsonl").exists()
    assert main(command[1:]) == 0
    assert all(p.stat().st_mtime_ns == t for p, t in done.items())  # finished units were not rescored
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert summary["units_resumed"] == len(finished)
    fresh = tmp_path / "fresh"
    assert main(["score", str(data), "--out", str(fresh / "kept.jsonl"), "--rejected", str(fresh / "rejected.jsonl"),
                 "--workers", "0", "--batch-size", "25", *CORPUS_DECISIONS]) == 0
    assert _outputs(out) == _outputs(fresh)  # same lines, none twice


@pytest.mark.slow
def test_ray_executor_writes_what_the_local_executor_writes(tmp_path, capsys):
    data = _corpus(tmp_path, 120, seed=31)
    runs = {}
    for executor in ("local", "ray"):
        folder = tmp_path / executor
        assert main(["score", str(data), "--out", str(folder / "kept.jsonl"), "--rejected",
                     str(folder / "rejected.jsonl"), "--report", str(folder / "report"), "--executor", executor,
                     "--workers", "0" if executor == "local" else "2", "--batch-size", "16", "--semdedup", "0.02",
                     *CORPUS_DECISIONS]) == 0
        runs[executor] = _outputs(folder)
        summary = json.loads((folder / "report" / "summary.json").read_text())
        assert summary["executor"] == executor
    assert runs["ray"] == runs["local"]
    assert len(summary["peak_rss_mb_per_worker"]) == 2  # two Ray actors shared the units
    rejected = [json.loads(line) for line in runs["ray"][1].decode().splitlines()]
    reasons = {r for doc in rejected for r in doc["quality"]["reasons"]}
    assert {"semdedup_duplicate", "sharma_bottom_percentile", "long_file"} <= reasons
    assert len(reasons - {"semdedup_duplicate", "sharma_bottom_percentile", "long_file"}) >= 2  # rule reasons too
    texts = {r["id"]: r["text"] for r in map(json.loads, data.read_text().splitlines())}
    lines = {i: {" ".join(line.lower().split()) for line in t.splitlines()} for i, t in texts.items()}
    dups = [d for d in rejected if "semdedup_duplicate" in d["quality"]["reasons"]]
    # each names its near-copy (the same lines up to case and spaces; lorem ipsum repeated 1-4 times counts too)
    assert dups and all(lines[d["id"]] == lines[d["quality"]["duplicate_of"]] for d in dups)
    bad = tmp_path / "bad.jsonl"  # a worker's bad record is the driver's error, with its message
    bad.write_text(json.dumps({"text": CLEAN}) + "\n" + json.dumps({"txt": "no text"}) + "\n")
    assert main(["score", str(bad), "--out", str(tmp_path / "k.jsonl"), "--executor", "ray", "--workers", "1"]) == 2
    assert "bad.jsonl:2: expected an object with a 'text' field" in capsys.readouterr().err


def test_the_k8s_job_example_is_valid_and_its_commands_parse():
    import kubernetes_validate
    import yaml

    from prunefusion.cli import build_parser, with_default_subcommand

    manifest = Path(__file__).parents[1] / "deploy" / "k8s" / "score-sharded-job.yaml"
    jobs = list(yaml.safe_load_all(manifest.read_text()))
    parser = build_parser()
    for job in jobs:
        kubernetes_validate.validate(job, "1.33", strict=True)  # raises on a schema error
        container = job["spec"]["template"]["spec"]["containers"][0]
        argv = [*container["command"][1:], *container["args"]]
        args = parser.parse_args(with_default_subcommand(parser, [a.replace("$(RANK)", "2") for a in argv]))
        assert args.work == Path("/data/work")
    score, merge = jobs
    assert score["spec"]["completionMode"] == "Indexed" and "--shard" in score["spec"]["template"]["spec"][
        "containers"][0]["args"]
    assert f"$(RANK)/{score['spec']['completions']}" in score["spec"]["template"]["spec"]["containers"][0]["args"]
