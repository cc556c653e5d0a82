"""`prunefusion reliability PROFILE`: run the scenarios (SCENARIOS, imported when they run), one after another,
into OUT/<name>/, then write OUT/results.json (every ScenarioResult) and OUT/report.md (the goals table, then each
scenario's figures, plots, reproducers and notes). Exit status 0 exactly when every goal of every scenario passed.

    prunefusion reliability short                      # what CI runs: every scenario, small counts
    prunefusion reliability long --only R1,R4 --out runs/rel-long

A scenario that cannot be imported (not written yet) or raises is recorded as failed with its error; the others
still run. A rerun replaces each scenario's own folder.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import shutil
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prunefusion.reliability.base import Goal, ScenarioResult

SCENARIOS = {  # name -> module with PROFILES and run(profile, out) (reliability/base.py)
    "R1": "prunefusion.reliability.r1_hostile",
    "R2": "prunefusion.reliability.r2_soak",
    "R3": "prunefusion.reliability.r3_redis",
    "R4": "prunefusion.reliability.r4_cancel",
    "R5": "prunefusion.reliability.r5_sigterm",
    "R6": "prunefusion.reliability.r6_kill_job",
    "R7": "prunefusion.reliability.r7_adversarial",
}
PROFILES = ("short", "long")
MAX_LISTED_REPRODUCERS = 50  # in report.md; results.json lists them all


def failed(name: str, title: str, error: str, notes: list[str], seconds: float = 0.0) -> ScenarioResult:
    return ScenarioResult(name, title, {"error": error}, [Goal("the scenario runs to its end", error, False)],
                          seconds=seconds, notes=notes)


def run_scenario(name: str, module_name: str, profile: str, out: Path) -> ScenarioResult:
    """One scenario into `out` (emptied first); never raises: a failure to import or run is its result."""
    start = time.monotonic()
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is None or not module_name.startswith(err.name):  # the module exists; something it imports not
            return failed(name, "(import failed)", f"{type(err).__name__}: {err}", [traceback.format_exc(limit=-3)])
        return failed(name, "(not available)", f"not available: {module_name} is not written yet", [])
    except Exception as err:  # noqa: BLE001 - recorded, the other scenarios still run
        return failed(name, "(import failed)", f"{type(err).__name__}: {err}", [traceback.format_exc(limit=-3)])
    profiles = getattr(module, "PROFILES", {})
    if profile not in profiles:
        return failed(name, module_name, f"no profile {profile!r} (it has {sorted(profiles)})", [])
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    try:
        result = module.run(profile, out)
    except Exception as err:  # noqa: BLE001 - recorded, the other scenarios still run
        return failed(name, module_name, f"{type(err).__name__}: {err}", [traceback.format_exc(limit=-5)],
                      time.monotonic() - start)
    result.seconds = result.seconds or time.monotonic() - start
    return result


def run_suite(profile: str, out: Path, only: list[str] | None = None,
              scenarios: dict[str, str] = SCENARIOS) -> int:
    """Run the chosen scenarios (all by default) and write the results; 0 iff every goal passed."""
    unknown = sorted(set(only or []) - set(scenarios))
    if unknown:
        raise ValueError(f"unknown scenario {', '.join(unknown)}; choose from {', '.join(scenarios)}")
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose from {', '.join(PROFILES)}")
    out.mkdir(parents=True, exist_ok=True)
    started, start = datetime.now(UTC), time.monotonic()
    results = []
    for name in [n for n in scenarios if only is None or n in only]:
        print(f"{name}: running ({scenarios[name]}, profile {profile})", flush=True)
        results.append(run_scenario(name, scenarios[name], profile, out / name))
        print(f"{name}: {'passed' if results[-1].passed else 'FAILED'} in {results[-1].seconds:.0f} s", flush=True)
    seconds = time.monotonic() - start
    passed = bool(results) and all(r.passed for r in results)
    write_json(out / "results.json", profile, started, seconds, passed, results, out)
    (out / "report.md").write_text(report(profile, started, seconds, passed, results, out))
    summarize(results, out)
    return 0 if passed else 1


def _plain(value: Any, out: Path) -> Any:
    """JSON-able: paths relative to `out`, non-finite floats as strings, dataclasses as dicts."""
    if isinstance(value, Path):
        return _relative(value, out)
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        return {str(k): _plain(v, out) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v, out) for v in value]
    if dataclasses.is_dataclass(value):
        return _plain(dataclasses.asdict(value), out)
    return value if value is None or isinstance(value, str | int | float | bool) else str(value)


def _relative(path: Path, out: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(out.resolve()))
    except ValueError:
        return str(path)


def write_json(path: Path, profile: str, started: datetime, seconds: float, passed: bool,
               results: list[ScenarioResult], out: Path) -> None:
    scenarios = [{**_plain(dataclasses.asdict(r), out), "passed": r.passed} for r in results]
    path.write_text(json.dumps({"profile": profile, "started": started.isoformat(timespec="seconds"),
                                "seconds": round(seconds, 1), "passed": passed, "scenarios": scenarios}, indent=1))


def _cell(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if isinstance(value, dict | list) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def report(profile: str, started: datetime, seconds: float, passed: bool, results: list[ScenarioResult],
           out: Path) -> str:
    goals = sum(len(r.goals) for r in results)
    ok = sum(g.passed for r in results for g in r.goals)
    lines = [f"# Reliability suite: profile `{profile}`", "",
             f"{started:%Y-%m-%d %H:%M} UTC, {seconds:.0f} s; **{'PASSED' if passed else 'FAILED'}**: {ok} of "
             f"{goals} goals met, {sum(r.passed for r in results)} of {len(results)} scenarios passed.", "",
             "| scenario | goal | measured | result | seconds |", "|---|---|---|---|---|"]
    for r in results:
        for i, goal in enumerate(r.goals or [Goal("(no goals)", "", False)]):
            name, secs = (f"{r.name} {r.title}", f"{r.seconds:.0f}") if i == 0 else ("", "")
            lines.append(f"| {_cell(name)} | {_cell(goal.text)} | {_cell(_plain(goal.value, out))} | "
                         f"{'pass' if goal.passed else '**FAIL**'} | {secs} |")
    for r in results:
        lines += ["", f"## {r.name} {r.title}", "", "| figure | value |", "|---|---|"]
        lines += [f"| {_cell(k)} | {_cell(_plain(v, out))} |" for k, v in r.figures.items()]
        lines += [""] + [f"![{r.name} {Path(p).stem}]({_relative(p, out)})" for p in r.plots]
        if r.reproducers:
            lines += ["", f"Reproducers ({len(r.reproducers)}):", ""]
            lines += [f"- [{Path(p).name}]({_relative(p, out)})" for p in r.reproducers[:MAX_LISTED_REPRODUCERS]]
            if len(r.reproducers) > MAX_LISTED_REPRODUCERS:
                lines.append(f"- ... and {len(r.reproducers) - MAX_LISTED_REPRODUCERS} more (results.json)")
        if r.notes:
            lines += ["", "Notes:", ""] + [f"- {_cell(note)}" for note in r.notes]
    return "\n".join(lines) + "\n"


def summarize(results: list[ScenarioResult], out: Path) -> None:
    """A short table on stdout (rich when installed, plain text otherwise)."""
    rows = [(r.name, r.title, f"{sum(g.passed for g in r.goals)}/{len(r.goals)}", f"{r.seconds:.0f}",
             "passed" if r.passed else "FAILED", "; ".join(g.text for g in r.goals if not g.passed)[:80])
            for r in results]
    header = ("scenario", "title", "goals", "seconds", "result", "failed goals")
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        for row in (header, *rows):
            print("  ".join(row))
    else:
        table = Table(*header, title=f"reliability: {out / 'report.md'}")
        for row in rows:
            table.add_row(*row, style=None if row[4] == "passed" else "red")
        Console().print(table)
