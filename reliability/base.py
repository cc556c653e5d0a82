"""What every reliability scenario shares: its profile knobs, its result (figures, goals, plots), the table of
scenarios the runner walks (run.py).

A scenario is a module `reliability/rN_*.py` with `PROFILES = {"short": Knobs(...), "long": Knobs(...)}` (its own
frozen dataclass of counts and time limits: "short" is what CI runs, "long" the figures in RESULTS.md) and
`run(profile: str, out: Path) -> ScenarioResult`, writing its plots and reproducers under `out`; it starts
what it needs (servers through loadtest's ServerProcess, redis-servers, jobs) on loopback only, bounds every loop in
count and time, and stops everything it started, also when it fails.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Goal:
    """One goal of the issue, judged on a measured value: `passed` is computed, never assumed."""

    text: str  # e.g. "0 INTERNAL or UNKNOWN statuses"
    value: Any  # the measured figure the goal is judged on
    passed: bool


@dataclass
class ScenarioResult:
    name: str  # "R1"
    title: str  # "hostile input"
    figures: dict[str, Any]  # every number measured (JSON-serialisable)
    goals: list[Goal] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)  # PNGs written under the run's output directory
    reproducers: list[Path] = field(default_factory=list)  # saved inputs that produced a bad status or a hang
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)  # what the reader should know (e.g. a part skipped and why)

    @property
    def passed(self) -> bool:
        return all(goal.passed for goal in self.goals)
