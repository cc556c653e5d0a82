"""`prunefusion score FILES...`: kept and rejected files, reasons, a global percentile, the report."""

from __future__ import annotations

import json

import pytest
from test_quality_server import CLEAN, JUNK

from prunefusion.cli import main
from prunefusion.quality.pipeline import ScoreOptions, score_batch
from prunefusion.quality.sharma import load_weights


@pytest.mark.parametrize("workers", ["0", "2"])
def test_score_files_split_kept_and_rejected_with_reasons(tmp_path, workers):
    data = tmp_path / "docs.jsonl"
    rows = [{"id": f"d{i}", "text": CLEAN if i % 2 else JUNK, "source": "test"} for i in range(10)]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    page = tmp_path / "page.txt"
    page.write_text(CLEAN)
    out, rejected, report = tmp_path / "kept.jsonl", tmp_path / "rejected.jsonl", tmp_path / "report"
    assert main(["score", str(data), str(page), "--out", str(out), "--rejected", str(rejected), "--report",
                 str(report), "--workers", workers, "--batch-size", "3"]) == 0
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    dropped = [json.loads(line) for line in rejected.read_text().splitlines()]
    assert sorted(r["id"] for r in kept) == sorted([f"d{i}" for i in range(1, 10, 2)] + [str(page)])
    assert all(r["source"] == "test" and r["quality"]["reasons"] for r in dropped)  # input fields kept
    expected = {r.id: r for r in score_batch([(r["id"], r["text"]) for r in rows], ScoreOptions(),
                                             load_weights(None)).results}
    for r in dropped:
        assert r["quality"]["reasons"] == list(expected[r["id"]].reasons)
        assert r["quality"]["score"] == pytest.approx(expected[r["id"]].score)
    summary = json.loads((report / "summary.json").read_text())
    assert summary["documents"] == 11 and summary["kept"] == 6
    assert sum(summary["reason_counts"].values()) == sum(len(r["quality"]["reasons"]) for r in dropped)
    assert (report / "score_histogram.png").stat().st_size > 0 and "| reason |" in (report / "report.md").read_text()


def test_bottom_percent_is_over_all_documents_and_bad_input_is_an_error(tmp_path, capsys):
    data = tmp_path / "docs.jsonl"
    texts = [CLEAN, JUNK, CLEAN.replace("library", "tool"), JUNK + "\nMore text here.", CLEAN[:200]]
    data.write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n")
    out = tmp_path / "kept.jsonl"
    assert main(["score", str(data), "--out", str(out), "--methods", "sharma", "--drop-bottom-percent", "40",
                 "--workers", "0", "--batch-size", "2"]) == 0  # batches of 2: a per-batch percentile would differ
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    scores = sorted(r.score for r in score_batch([(str(i), t) for i, t in enumerate(texts)],
                                                 ScoreOptions(methods=("sharma",)), load_weights(None)).results)
    assert sorted(r["quality"]["score"] for r in kept) == pytest.approx(scores[2:])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": "no text field"}\n')
    assert main(["score", str(bad), "--out", str(out)]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err
    assert main(["score", str(data), "--out", str(out), "--threshold", "gopher_quality.max_foo=1"]) == 2
    assert "max_foo" in capsys.readouterr().err


@pytest.mark.slow
def test_semdedup_and_long_files_over_the_whole_input(tmp_path):
    data = tmp_path / "docs.jsonl"
    texts = [CLEAN, CLEAN.replace("  ", " ") + "\n", CLEAN.upper().lower(), "A short note about the weather today.",
             "Trains leave the station every hour on weekdays, and less often at the weekend.", JUNK * 3]
    data.write_text("\n".join(json.dumps({"id": f"d{i}", "text": t}) for i, t in enumerate(texts)) + "\n")
    out, rejected = tmp_path / "kept.jsonl", tmp_path / "rejected.jsonl"
    assert main(["score", str(data), "--out", str(out), "--rejected", str(rejected), "--methods", "sharma",
                 "--semdedup", "0.01", "--long-files", "17", "--workers", "0"]) == 0
    reasons = {json.loads(line)["id"]: json.loads(line)["quality"]["reasons"]
               for line in rejected.read_text().splitlines()}
    # d0..d2 are one text up to whitespace and case: exactly two of them are duplicates; d5 is the longest (1 of 6)
    assert sum("semdedup_duplicate" in reasons.get(f"d{i}", []) for i in range(3)) == 2
    assert "long_file" in reasons["d5"] and "d3" not in reasons and "d4" not in reasons


def test_kept_text_is_what_c4_left_unless_keep_text_and_profiles_differ(tmp_path):
    cited = CLEAN.replace("right type", "right type[1]") + "\nMenu"
    data = tmp_path / "docs.jsonl"
    data.write_text(json.dumps({"id": "cited", "text": cited}) + "\n" + json.dumps({"id": "junk", "text": JUNK}) + "\n")
    runs = {}
    for name, extra in {"datatrove": [], "keep": ["--keep-text"],
                        "paper": ["--rule-profile", "gopher-paper"]}.items():
        out, rejected = tmp_path / f"{name}.jsonl", tmp_path / f"{name}-rejected.jsonl"
        assert main(["score", str(data), "--out", str(out), "--rejected", str(rejected), "--workers", "0", *extra]) == 0
        runs[name] = ({r["id"]: r for r in map(json.loads, out.read_text().splitlines())},
                      {r["id"]: r for r in map(json.loads, rejected.read_text().splitlines())})
    kept, rejected = runs["datatrove"]
    assert kept["cited"]["text"] == CLEAN.replace("\n\n", "\n") and kept["cited"]["quality"]["rewritten"]
    assert len(rejected["junk"]["quality"]["reasons"]) == 1  # a datatrove pipeline names the first failed rule
    assert runs["keep"][0]["cited"]["text"] == cited and "rewritten" not in runs["keep"][0]["cited"]["quality"]
    assert runs["paper"][0]["cited"]["text"] == cited and len(runs["paper"][1]["junk"]["quality"]["reasons"]) > 1
