"""The reliability suite (reliability/, `prunefusion reliability`): the runner's records and report for every way a
scenario can end, the hostile cases' determinism, and the short profile of R1, R2 and R4 against a real served pico
deployment (one subprocess run, about 2 minutes on 2 cores, shared by the tests below it)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest

from prunefusion.reliability import hostile_cases as hc
from prunefusion.reliability.run import run_suite

FAKE = textwrap.dedent('''
    from prunefusion.reliability.base import Goal, ScenarioResult

    PROFILES = {"short": None}

    def run(profile, out):
        if MODE == "raise":
            raise RuntimeError("boom in the scenario")
        plot = out / "plot.png"
        plot.write_bytes(b"png")
        return ScenarioResult(NAME, "fake", {"value": 3}, [Goal("value is 3", 3, True),
                              Goal("value is 4", 3, MODE == "pass")], [plot], [], 0.5, ["a note"])
''')


def fake_scenario(folder: Path, module: str, name: str, mode: str) -> str:
    (folder / f"{module}.py").write_text(f"NAME, MODE = {name!r}, {mode!r}\n" + FAKE)
    return module


def test_runner_records_passes_failures_errors_and_missing_scenarios(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "fake_broken_import.py").write_text("import no_such_dependency_of_a_scenario\n")
    table = {"A": fake_scenario(tmp_path, "fake_pass", "A", "pass"),
             "B": fake_scenario(tmp_path, "fake_fail", "B", "fail"),
             "C": fake_scenario(tmp_path, "fake_raise", "C", "raise"),
             "D": "prunefusion.reliability.r99_not_written",
             "E": "fake_broken_import"}
    out = tmp_path / "out"
    assert run_suite("short", out, scenarios=table) == 1
    data = json.loads((out / "results.json").read_text())
    results = {s["name"]: s for s in data["scenarios"]}
    assert list(results) == list(table) and data["profile"] == "short" and data["passed"] is False
    assert results["A"]["passed"] and results["A"]["plots"] == ["A/plot.png"] and (out / "A/plot.png").is_file()
    assert not results["B"]["passed"] and [g["passed"] for g in results["B"]["goals"]] == [True, False]
    assert not results["C"]["passed"] and "boom in the scenario" in results["C"]["figures"]["error"]
    assert results["D"]["title"] == "(not available)" and "not written" in results["D"]["figures"]["error"]
    assert results["E"]["title"] == "(import failed)" and "no_such_dependency" in results["E"]["figures"]["error"]
    report = (out / "report.md").read_text()
    assert "| A fake | value is 3 | 3 | pass |" in report and "| B fake | value is 3 | 3 | pass |" in report
    assert "| value is 4 | 3 | **FAIL** |" in report and "![A plot](A/plot.png)" in report
    assert "not available" in report and "- a note" in report and "1 of 5 scenarios passed" in report
    assert "FAILED" in capsys.readouterr().out
    # the passing one alone: exit status 0; a rerun replaces its folder
    (out / "A" / "stale.txt").write_text("from an earlier run")
    assert run_suite("short", out, only=["A"], scenarios=table) == 0
    assert not (out / "A" / "stale.txt").exists()
    with pytest.raises(ValueError, match="unknown scenario R9"):
        run_suite("short", out, only=["R9"])
    with pytest.raises(ValueError, match="unknown profile"):
        run_suite("medium", out)


def test_hostile_cases_are_the_same_every_run_and_cover_every_method_and_kind():
    cases = hc.draw_cases(300)
    written = json.dumps([hc.describe(c) for c in cases])  # every case can be written down as a reproducer
    assert written == json.dumps([hc.describe(c) for c in hc.draw_cases(300)])  # (NaN != NaN: compared as text)
    assert len(set(cases)) == 300
    assert {c.method for c in cases} == set(hc.METHODS)
    assert {c.kind for c in cases} == set(hc.CASE_WEIGHTS)
    for case in cases[:100]:
        assert all(isinstance(body, bytes) for body in hc.bodies(case))


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reliability") / "short"
    done = subprocess.run([sys.executable, "-m", "prunefusion.cli", "reliability", "short", "--only", "R1,R2,R4",
                           "--out", str(out)], capture_output=True, text=True, timeout=420)
    assert (out / "results.json").is_file(), done.stdout[-3000:] + done.stderr[-3000:]
    return done, out, json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_short_profile_writes_results_and_report(short_run):
    done, out, data = short_run
    results = {s["name"]: s for s in data["scenarios"]}
    assert list(results) == ["R1", "R2", "R4"] and data["profile"] == "short"
    assert (done.returncode == 0) == data["passed"] == all(r["passed"] for r in results.values())
    report = (out / "report.md").read_text()
    for name, result in results.items():
        assert result["goals"] and result["seconds"] > 0 and "error" not in result["figures"], result["figures"]
        assert result["passed"] == all(goal["passed"] for goal in result["goals"])
        assert f"## {name} {result['title']}" in report
        for goal in result["goals"]:
            assert goal["text"] in report
        for path in result["plots"] + result["reproducers"]:
            assert (out / path).is_file()
    for link in re.findall(r"\]\(([^)]+)\)", report):
        assert (out / link).is_file(), link
    r1 = results["R1"]["figures"]
    assert r1["cases"] >= 600 and sum(r1["statuses"].values()) == r1["cases"]
    assert set(r1["by_method"]) == {m.rsplit("/", 1)[1] for m in hc.METHODS}
    assert r1["health_checks"] >= 6 and r1["warmup"]["Generate"] == "OK"
    bad = sum(r1["statuses"].get(status, 0) for status in ("INTERNAL", "UNKNOWN", "HANG"))
    assert len(results["R1"]["reproducers"]) == bad
    for path in results["R1"]["reproducers"]:
        record = json.loads((out / path).read_text())
        assert record["method"] in hc.METHODS and record["status"] in ("INTERNAL", "UNKNOWN", "HANG")
    r2, r4 = results["R2"]["figures"], results["R4"]["figures"]
    assert r2["streams"] == 16 and r2["requests_completed"] > 0 and r2["fds_start"] > 0
    assert r4["requests_started"] == 200 and r4["followup_ok"].endswith("/16")


@pytest.mark.slow
def test_short_profile_meets_every_goal(short_run):
    _, _, data = short_run
    failed = Counter()
    for scenario in data["scenarios"]:
        for goal in scenario["goals"]:
            if not goal["passed"]:
                failed[f"{scenario['name']}: {goal['text']} (measured {goal['value']})"] += 1
    assert not failed, sorted(failed)
