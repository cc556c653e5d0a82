"""`prunefusion loadtest`: locust in its own process against a live server; statistics against hand computation."""

from __future__ import annotations

import json

import pytest

from prunefusion.loadtest.stats import run_stats, tpot


def test_stats_follow_the_definitions():
    records = [  # a warm-up request, two good ones, one refused
        {"start": 0.0, "e2e": 9.0, "ttft": 1.0, "tokens": 9, "itl": [1.0] * 8, "status": "OK"},
        {"start": 10.0, "e2e": 1.0, "ttft": 0.2, "tokens": 5, "itl": [0.2] * 4, "status": "OK"},
        {"start": 10.5, "e2e": 1.5, "ttft": 0.3, "tokens": 4, "itl": [0.4] * 3, "status": "OK"},
        {"start": 11.0, "e2e": 0.01, "ttft": None, "tokens": 0, "itl": [], "status": "RESOURCE_EXHAUSTED"},
    ]
    assert tpot(records[1]) == pytest.approx(0.8 / 4)
    stats = run_stats(records, warmup_s=5.0)
    assert stats["requests"] == 3 and stats["ok"] == 2 and stats["errors"] == {"RESOURCE_EXHAUSTED": 1}
    assert stats["window_s"] == pytest.approx(12.0 - 5.0)  # first counted start + warm-up -> last end
    assert stats["output_tokens_per_s"] == pytest.approx(9 / 7.0)
    assert stats["ttft_s"]["mean"] == pytest.approx(0.25) and stats["ttft_s"]["p50"] == pytest.approx(0.25)
    assert stats["tpot_s"]["mean"] == pytest.approx((0.2 + 0.4) / 2)
    assert stats["itl_s"]["p99"] == pytest.approx(0.4) and stats["e2e_s"]["mean"] == pytest.approx(1.25)


@pytest.mark.slow
def test_a_headless_run_reports_every_request_and_counts_overload(server, tmp_path, capsys):
    from prunefusion.cli import main

    out = tmp_path / "lt"
    # pico batches 8 rows: 6 users run without errors; pico-one has one slot and a queue of one: the rest are refused
    assert main(["loadtest", "--target", server.target, "--models", "pico", "pico-one", "--concurrency", "6",
                 "--duration", "5", "--warmup", "0.5", "--max-new-tokens", "24", "--prompt-words", "8",
                 "--out", str(out)]) == 0
    rows = {r["model"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert rows["pico"]["ok"] > 0 and rows["pico"]["errors"] == 0 and rows["pico"]["output_tokens_per_s"] > 0
    for name in ("pico", "pico-one"):
        records = [json.loads(line) for line in (out / "records" / f"{name}-c6.jsonl").read_text().splitlines()]
        ok = [r for r in records if r["status"] == "OK"]
        assert ok and all(0 < r["ttft"] <= r["e2e"] and r["tokens"] > 0 for r in ok)
    refused = [json.loads(line)["status"] for line in (out / "records" / "pico-one-c6.jsonl").read_text().splitlines()]
    assert "RESOURCE_EXHAUSTED" in refused and rows["pico-one"]["errors"] > 0
    report = (out / "report.md").read_text()
    assert "| pico | 6 |" in report and "(1.00x)" in report  # same layers: ideal ratio 1
    for name in ("latency_cdf.png", "scaling.png", "results.csv"):
        assert (out / name).stat().st_size > 0
