"""The fault scenarios' short profiles (reliability R3 Redis restart, R5 SIGTERM drain, R6 killed compression job):
real servers, a real redis-server and real job processes, killed for real. Each scenario runs once per module; the
tests judge its goals."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def suite_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("reliability")  # the pico models are built once beside the scenarios' folders


def _run(name: str, suite_dir: Path):
    """The scenario's short profile; its figures and goals also go to DIR/result.json, to read after a failure."""
    import importlib
    import json

    module = importlib.import_module(f"prunefusion.reliability.{name}")
    result = module.run("short", suite_dir / name)
    goals = [{"text": g.text, "value": g.value, "passed": g.passed} for g in result.goals]
    (suite_dir / name / "result.json").write_text(json.dumps({"figures": result.figures, "goals": goals,
                                                              "seconds": result.seconds}, indent=1, default=str))
    return result


def _goal(result, starts: str):
    goals = [g for g in result.goals if g.text.startswith(starts)]
    assert len(goals) == 1, [g.text for g in result.goals]
    return goals[0]


@pytest.fixture(scope="module")
def r3(suite_dir):
    return _run("r3_redis", suite_dir)


@pytest.fixture(scope="module")
def r5(suite_dir):
    return _run("r5_sigterm", suite_dir)


@pytest.fixture(scope="module")
def r6(suite_dir):
    return _run("r6_kill_job", suite_dir)


@pytest.mark.timeout(300)
def test_r3_redis_down_and_back_fails_no_request_and_costs_at_most_the_timeout(r3):
    phases = r3.figures["phases"]
    assert [phases[p]["failed"] for p in ("up", "down", "restarted")] == [0, 0, 0], phases
    assert phases["up"]["hits"] > 0 and phases["restarted"]["hits"] > 0  # a hit is a Redis entry, not single-flight
    assert phases["down"]["hits"] == 0  # no Redis, no stored entries: the model ran (or single-flight shared)
    assert _goal(r3, "0 failed requests").passed
    assert _goal(r3, "with Redis down, added latency").passed, r3.figures
    assert all(plot.stat().st_size > 0 for plot in r3.plots)


@pytest.mark.timeout(300)
def test_r3_first_hit_within_2_s_of_redis_returning(r3):
    assert _goal(r3, "first hit").passed, r3.figures["time_to_first_hit_s"]


@pytest.mark.timeout(300)
def test_r5_sigterm_without_delay_drains_in_flight_calls_and_exits_0(r5):
    run = r5.figures["runs"]["D=0s"]
    assert "error" not in run, run
    assert run["in_flight_at_sigterm"]["calls"] > 0  # the signal came under load
    assert _goal(r5, "D=0s: every call in flight at SIGTERM completes").passed, run["in_flight_at_sigterm"]
    assert _goal(r5, "D=0s: exit code 0").passed, run["exit_code"]
    assert _goal(r5, "D=0s: NOT_SERVING observed").passed, run["health_transitions"]


@pytest.mark.timeout(300)
def test_r5_with_a_drain_delay_a_client_sending_during_it_sees_no_failure(r5):
    run = r5.figures["runs"]["D=2s"]
    assert "error" not in run, run
    assert run["sent_in_window"]["calls"] > 0  # the client kept sending after SIGTERM
    assert _goal(r5, "D=2s: 0 failed requests").passed, (run["in_flight_at_sigterm"], run["sent_in_window"])
    assert _goal(r5, "D=2s: exit code 0").passed
    assert _goal(r5, "D=2s: NOT_SERVING observed").passed
    assert run["listener_closed_at_s"] >= 2.0 - 0.05  # the port kept accepting through the delay


@pytest.mark.timeout(400)
def test_r6_a_killed_job_never_leaves_a_half_written_file_a_rerun_trusts_and_resumes(r6):
    f = r6.figures
    assert f["kills"] >= 2 and any(stage.startswith("heal") for stage in f["stage_per_kill"]), f["kill_details"]
    assert any(k["saving"] for k in f["kill_details"]), "no kill landed during a save"
    assert _goal(r6, "0 half-written files").passed, f["kill_details"]
    assert _goal(r6, "every resumed run finishes").passed, f["reruns"]
    assert _goal(r6, "a rerun redoes no finished stage").passed, f["reruns"]
    assert f["heal_steps_not_redone"] > 0  # a rerun resumed healing from a checkpoint, not from step 0
    last = f["reruns"][-1]
    assert last["outcome"] == "finished"
    if "heal_resumed_from" in last:  # the last run healed to the end: from the checkpoint it found
        assert last["heal_resumed_from"] == last["found_checkpoint"]


@pytest.mark.timeout(400)
def test_r6_the_resumed_job_equals_the_uninterrupted_one(r6):
    assert _goal(r6, "resumed == uninterrupted").passed, r6.figures
