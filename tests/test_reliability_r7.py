"""Reliability scenario R7 (adversarial documents through QualityFilter.Score), short profile, against a real
served pico deployment: every goal met (about 35 s on 2 cores, the pico LM's build included)."""

from __future__ import annotations

import time

import pytest

from prunefusion.reliability import r7_adversarial as r7


@pytest.mark.slow
def test_the_short_profile_meets_its_goals(tmp_path):
    started = time.monotonic()
    result = r7.run("short", tmp_path / "R7")
    assert result.passed, [goal for goal in result.goals if not goal.passed]
    assert [plot.name for plot in result.plots] == ["r7_adversarial.png"] and result.plots[0].stat().st_size > 0
    assert set(result.figures["seconds"]) == set(r7.PROFILES["short"].shapes)
    assert all(r[1024] == ["document_too_long"] for r in result.figures["reasons"].values())  # the bound's path
    assert any("R1" in note for note in result.notes)
    assert time.monotonic() - started < 60  # the profile's budget is 40 s; room for a busy host
