"""`prunefusion loadtest`: locust in its own process against a live server; statistics against hand computation."""

from __future__ import annotations

import json

import pytest

from prunefusion.loadtest.stats import max_in_flight, meets, pooled_stats, run_stats, tpot


def test_stats_follow_the_definitions():
    records = [  # a warm-up request, two good ones, one refused
        {"start": 0.0, "e2e": 9.0, "ttft": 1.0, "tokens": 9, "itl": [1.0] * 8, "status": "OK"},
        {"start": 10.0, "e2e": 1.0, "ttft": 0.2, "tokens": 5, "itl": [0.2] * 4, "status": "OK"},
        {"start": 10.5, "e2e": 1.5, "ttft": 0.3, "tokens": 4, "itl": [0.4] * 3, "status": "OK"},
        {"start": 11.0, "e2e": 0.01, "ttft": None, "tokens": 0, "itl": [], "status": "RESOURCE_EXHAUSTED"},
    ]
    assert tpot(records[1]) == pytest.approx(0.8 / 4)
    stats = run_stats(records, warmup_s=5.0)
    # latency and errors: the three requests started after the warm-up
    assert stats["requests"] == 3 and stats["ok"] == 2 and stats["errors"] == {"RESOURCE_EXHAUSTED": 1}
    assert stats["output_tokens_mean"] == pytest.approx((5 + 4) / 2)
    assert stats["max_in_flight"] == 2  # 10.0-11.0 with 10.5-12.0, then 10.5-12.0 with 11.0-11.01
    assert max_in_flight([records[1], records[3]]) == 1  # one starts as the other ends: never two at once
    assert max_in_flight(records[:2]) == 1
    # throughput: completions in [first start + warm-up, last start] = [5, 11]: the warm-up request (ends at 9) and
    # the second (ends at 11); the third ends at 12, after the load generator stopped, and the refusal at 11.01
    assert stats["window_s"] == pytest.approx(11.0 - 5.0)
    assert stats["requests_per_s"] == pytest.approx(2 / 6.0)
    assert stats["output_tokens_per_s"] == pytest.approx((9 + 5) / 6.0)
    assert stats["ttft_s"]["mean"] == pytest.approx(0.25) and stats["ttft_s"]["p50"] == pytest.approx(0.25)
    assert stats["tpot_s"]["mean"] == pytest.approx((0.2 + 0.4) / 2)
    assert stats["itl_s"]["p99"] == pytest.approx(0.4) and stats["e2e_s"]["mean"] == pytest.approx(1.25)
    assert stats["goodput_per_s"] is None  # no SLO given
    # SLO ttft <= 250 ms and e2e <= 1.2 s: only the second request (TTFT 0.2, e2e 1.0) meets both
    assert [meets(r, {"ttft": 0.25, "e2e": 1.2}) for r in records] == [False, True, False, False]
    assert meets(records[2], {"tpot": 0.4}) and not meets(records[2], {"tpot": 0.39})  # (1.5 - 0.3) / 3
    assert not meets({**records[1], "ttft": None}, {"ttft": 1.0})  # no TTFT (unary): a TTFT bound is not met
    slo_stats = run_stats(records, warmup_s=5.0, slo={"ttft": 0.25, "e2e": 1.2})
    assert slo_stats["goodput_per_s"] == pytest.approx(1 / 6.0)  # of the two completed in the window, one met both
    later = [{**r, "start": r["start"] + 100.0} for r in records]  # a second round of the same requests
    pooled = pooled_stats([records, later], warmup_s=5.0)
    assert pooled["requests"] == 6 and pooled["window_s"] == pytest.approx(12.0)  # two windows of 6 s
    assert pooled["output_tokens_per_s"] == pytest.approx(stats["output_tokens_per_s"])
    assert pooled["e2e_s"]["mean"] == stats["e2e_s"]["mean"] and pooled["max_in_flight"] == 2
    empty = run_stats([], warmup_s=1.0)  # a run that recorded nothing still has every key
    assert set(empty) == set(stats) and empty["requests"] == 0 and empty["e2e_s"]["p99"] is None


@pytest.mark.slow
def test_a_headless_run_reports_every_request_and_counts_overload(server, tmp_path, capsys):
    from prunefusion.cli import main

    out = tmp_path / "lt"
    # pico batches 8 rows: 6 users run without errors; pico-one has one slot and a queue of one: the rest are refused
    assert main(["loadtest", "--target", server.target, "--models", "pico", "pico-one", "--concurrency", "6",
                 "--duration", "5", "--warmup", "0.5", "--max-new-tokens", "24", "--prompt-words", "8",
                 "--rounds", "2", "--out", str(out)]) == 0
    rows = {r["model"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert rows["pico"]["ok"] > 0 and rows["pico"]["errors"] == 0 and rows["pico"]["output_tokens_per_s"] > 0
    def records(name: str, round_number: int) -> list[dict]:
        path = out / "records" / f"{name}-c6-r{round_number}.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]

    for name in ("pico", "pico-one"):
        for round_number in (1, 2):
            ok = [r for r in records(name, round_number) if r["status"] == "OK"]
            assert ok and all(0 < r["ttft"] <= r["e2e"] and r["tokens"] > 0 for r in ok)
    refused = [r["status"] for r in records("pico-one", 1) + records("pico-one", 2)]
    assert "RESOURCE_EXHAUSTED" in refused and rows["pico-one"]["errors"] > 0
    # two rounds, pooled: the row counts both rounds' requests and keeps each round's throughput
    assert rows["pico"]["requests"] == sum(run_stats(records("pico", k), 0.5)["requests"] for k in (1, 2))
    assert len(rows["pico"]["throughput_by_round"]) == 2
    report = (out / "report.md").read_text()
    assert "| pico | c=6 |" in report and "(1.00x); rounds 1.00 / 1.00" in report  # same layers: ideal ratio 1
    for name in ("latency_cdf.png", "scaling.png", "results.csv"):
        assert (out / name).stat().st_size > 0


@pytest.mark.slow
def test_open_loop_and_image_rpcs_with_goodput(mm_server, tmp_path):
    from prunefusion.cli import main

    out = tmp_path / "lt"
    assert main(["loadtest", "--target", mm_server.target, "--models", "pico-lm", "pico-tf", "--quality",
                 "--concurrency", "2", "--rates", "4", "--duration", "4", "--warmup", "0", "--max-new-tokens", "64",
                 "--prompt-words", "4", "--image-steps", "2", "--caption-weight", "1", "--score-docs", "4",
                 "--slo-e2e-ms", "60000", "--seed", "1", "--out", str(out)]) == 0
    rows = {(r["model"], r["load"]): r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert set(rows) == {(m, load) for m in ("pico-lm", "pico-tf", "QualityFilter") for load in ("c=2", "4/s")}
    scored = [json.loads(line) for line in (out / "records" / "QualityFilter-c2.jsonl").read_text().splitlines()]
    assert {r["rpc"] for r in scored} == {"Score"} and all(r["tokens"] == 4 for r in scored)  # 4 documents each
    for row in rows.values():
        assert row["ok"] > 0 and row["errors"] == 0
        assert row["goodput_per_s"] == pytest.approx(row["requests_per_s"])  # a 60 s bound: every request meets it
    image_rpcs = {json.loads(line)["rpc"] for line in (out / "records" / "pico-tf-c2.jsonl").read_text().splitlines()}
    assert image_rpcs == {"GenerateImage", "Caption"}
    # open loop: Poisson arrivals at 4/s for 4 s start ~16 requests whatever the latency, and a request does not
    # wait for the previous one. The gaps are seeded: with --seed 1 some arrivals come 0.01-0.03 s apart, while a
    # 64-token request takes ~0.1 s or more, so a correct open loop overlaps them and a synchronous one cannot
    assert 4 <= rows[("pico-lm", "4/s")]["requests"] <= 40
    assert rows[("pico-lm", "4/s")]["max_in_flight"] >= 2 and rows[("pico-lm", "c=2")]["max_in_flight"] <= 2
    assert "4/s" in (out / "report.md").read_text()


@pytest.mark.slow
def test_serve_starts_a_server_process_for_the_test_and_stops_it(pico_dir, tmp_path):
    import yaml

    from prunefusion.cli import main

    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"server": {"metrics_port": None, "http_port": None}, "cache": {"enabled": False},
                                      "models": [{"name": "pico", "path": str(pico_dir)}]}))
    out = tmp_path / "lt"
    assert main(["loadtest", "--serve", str(config), "--models", "pico", "--apis", "grpc", "http", "--concurrency",
                 "1", "--duration", "2", "--warmup", "0", "--max-new-tokens", "24", "--prompt-words", "4",
                 "--out", str(out)]) == 0
    grpc_row, http_row = json.loads((out / "results.json").read_text())["rows"]
    assert (grpc_row["model"], http_row["model"]) == ("pico", "pico@http")
    for row in (grpc_row, http_row):  # both front ends: streamed requests, their first tokens and token counts
        assert row["ok"] > 0 and row["errors"] == 0 and row["ttft_p50_ms"] > 0 and row["output_tokens_per_s"] > 0
        # the first of 24 tokens is timed when it arrives, not when a buffered read of the stream returns
        assert row["ttft_p50_ms"] < row["e2e_p50_ms"] / 2, row
    log = (out / "server.log").read_text()
    assert "SERVING pico" in log and "stopped" in log  # started for the test, drained at the end


def test_a_server_that_cannot_start_says_why(tmp_path):
    from prunefusion.loadtest.server_process import ServerProcess

    config = tmp_path / "bad.yaml"
    config.write_text("models:\n  - name: ghost\n    path: /nonexistent/model\n")
    with pytest.raises(RuntimeError, match=r"(?s)exited with .*end of its log.*nonexistent"):
        ServerProcess(config, startup_timeout_s=120, log=tmp_path / "server.log")


def test_the_locustfile_never_imports_torch_or_transformers():
    """They break locust's gevent ssl patching: the locustfile and the helpers it calls stay on grpc, numpy, PIL."""
    import subprocess
    import sys

    from prunefusion.loadtest.run import LOCUSTFILE

    check = ("import importlib.util, random, sys\n"
             f"spec = importlib.util.spec_from_file_location('locustfile', {str(LOCUSTFILE)!r})\n"
             "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
             "module.shapes_png(random.Random(0)); module.shapes_prompt(random.Random(0))\n"
             "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
             "assert not heavy, heavy; print('clean')")
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "clean" in done.stdout, done.stderr[-2000:]
