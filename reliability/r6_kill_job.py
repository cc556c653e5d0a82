"""R6: a compression job SIGKILLed mid-heal and mid-save: it resumes, and no path a run trusts is ever half-written.

A tiny job (the pico LM, one layer pruned, a few dozen QLoRA steps with frequent checkpoints) runs as
`prunefusion compress run JOB --out DIR` in a subprocess, once uninterrupted (the reference) and once as a chain:
start, SIGKILL at a trigger, check every file, start the same command again, ... until a run finishes. Triggers:
"heal" (a little after this run wrote a heal checkpoint), "save" (the moment a new `*.partial` appears: a
checkpoint, the merged model, a stage record being written), "random" (a random time within the run's expected
remaining time; the reference's stage times say how long).

After each kill every file at a final name under DIR.partial (and DIR) is opened: safetensors read whole, JSON and
YAML parsed, state.pt loaded, PNGs verified. A file is "trusted" when a rerun reads it instead of rewriting it: the
stage records, job.yaml, complete heal checkpoints (step-N/ with state.pt), a finished stage's folder, DIR. A
rerun resumed when the records and checkpoints that existed at its start are still the same files (not rewritten)
and, for the run that healed to the end, its heal record starts at the checkpoint it found.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from prunefusion.reliability import common
from prunefusion.reliability.base import Goal, ScenarioResult

STAGES = ("measure", "prune", "heal", "evaluate")


@dataclass(frozen=True)
class Knobs:
    kills: tuple[str, ...]  # the chain's triggers, in order: "heal", "save", "random"
    heal_steps: int
    checkpoint_every: int
    parallel_reference: bool = False  # run the reference beside the chain (no "random" kills: they need its times)
    seed: int = 0  # of the random kill times
    poll_s: float = 0.003  # a checkpoint of the pico adapter is written in tens of milliseconds
    run_timeout_s: float = 300.0


PROFILES = {
    "short": Knobs(kills=("heal", "save"), heal_steps=24, checkpoint_every=4, parallel_reference=True),
    "long": Knobs(kills=("heal", "save", "random", "save", "heal", "random", "save", "random"), heal_steps=120,
                  checkpoint_every=10),
}


def run(profile: str, out: Path) -> ScenarioResult:
    knobs = PROFILES[profile]
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    job = _write_job(out, _pico_lm_3(out.parent), knobs)
    reference_out, chain_out = out / "reference" / "out", out / "chain" / "out"
    for folder in (reference_out.parent, chain_out.parent):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    if knobs.parallel_reference and "random" in knobs.kills:
        raise ValueError("random kills need the reference's times: parallel_reference=False")
    began = time.monotonic()
    reference = _start(job, reference_out, out / "reference" / "run.log")
    try:
        if knobs.parallel_reference:
            kills, reruns, finished = _chain(job, chain_out, knobs, None)
        if reference.wait(knobs.run_timeout_s) != 0:
            raise RuntimeError(f"the uninterrupted job failed (see {out / 'reference' / 'run.log'})")
    finally:
        if reference.poll() is None:
            reference.kill()
            reference.wait()
    timing = _timing(reference_out, time.monotonic() - began)
    if not knobs.parallel_reference:
        kills, reruns, finished = _chain(job, chain_out, knobs, timing)
    figures = _figures(kills, reruns, finished, reference_out, chain_out)
    figures["reference_seconds"] = round(timing["total"], 1)  # beside the chain when parallel_reference
    result = ScenarioResult("R6", "a compression job SIGKILLed mid-heal and mid-save", figures, _goals(figures),
                            notes=_notes(figures))
    result.seconds = round(time.monotonic() - started, 1)
    return result


def _pico_lm_3(suite: Path) -> Path:
    """The suite's pico LM with 3 layers (pruning keeps the first and the last: one can go), its tokenizer reused:
    training a tokenizer is most of a pico build."""
    target = suite / "pico-lm-3"
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    source = common.build_pico_lm(suite / "pico-lm")
    config = LlamaConfig.from_pretrained(source, num_hidden_layers=3)
    torch.manual_seed(0)
    LlamaForCausalLM(config).eval().save_pretrained(target)
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    GenerationConfig.from_pretrained(source).save_pretrained(target)
    return target


def _write_job(out: Path, model_dir: Path, knobs: Knobs) -> Path:
    from prunefusion.models.corpus import pydoc_topics

    docs = pydoc_topics()
    texts, held = out / "texts.jsonl", out / "held.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[:24]))
    held.write_text("".join(json.dumps({"text": t[:600]}) + "\n" for t in docs[30:32]))  # evaluation: seconds
    job = {"name": "r6-kill", "model": str(model_dir),
           "calibration": {"data": [str(texts)], "samples": 4, "seq_len": 64, "batch_size": 4},
           "prune": {"strategy": "angular", "n": 1},
           "heal": {"data": [str(texts)], "steps": knobs.heal_steps, "batch_size": 4, "seq_len": 64,
                    "learning_rate": 1e-2, "warmup_steps": 1, "checkpoint_every": knobs.checkpoint_every},
           "evaluate": {"data": [str(held)]}}
    path = out / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def _start(job: Path, dest: Path, log: Path) -> subprocess.Popen:
    # one thread: the reference and the chain compute alike (CPU results can depend on the thread count)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "ab") as handle:
        return subprocess.Popen([sys.executable, "-m", "prunefusion.cli", "compress", "run", str(job), "--out",
                                 str(dest)], stdout=handle, stderr=subprocess.STDOUT, env=env)


def _timing(reference_out: Path, total: float) -> dict[str, float]:
    stages = json.loads((reference_out / "manifest.json").read_text())["stage_seconds"]
    return {"total": total, "startup": max(0.0, total - sum(stages.values())), **stages}


def _chain(job: Path, dest: Path, knobs: Knobs, timing: dict | None) -> tuple[list[dict], list[dict], dict]:
    """Run, kill at each trigger, check, rerun; then a last run to the end. -> (kills, reruns, the last run)."""
    work = dest.with_name(dest.name + ".partial")
    rng = random.Random(knobs.seed)
    kills, reruns = [], []
    for number, trigger in enumerate(knobs.kills):
        if dest.exists():
            break
        at_start = _state(work)
        proc = _start(job, dest, dest.parent / f"run-{number}.log")
        kill = _wait_and_kill(proc, work, trigger, knobs, at_start, _kill_time(rng, trigger, at_start, timing, knobs))
        if number:
            reruns.append(_resumed(at_start, _state(work), "killed" if kill else _outcome(proc, dest), dest))
        if kill is None:  # the run ended before its trigger fired
            break
        kill.update(trigger=trigger, files=_check_files(work, dest))
        kills.append(kill)
    finished = {"exit_code": None}
    if not dest.exists():
        at_start = _state(work)
        proc = _start(job, dest, dest.parent / "run-final.log")
        finished["exit_code"] = proc.wait(knobs.run_timeout_s)
        reruns.append(_resumed(at_start, _state(work), _outcome(proc, dest), dest))
    else:
        finished["exit_code"] = 0 if dest.exists() else None
    return kills, reruns, finished


def _outcome(proc: subprocess.Popen, dest: Path) -> str:
    return "finished" if proc.returncode == 0 and dest.exists() else f"failed (exit {proc.returncode})"


def _kill_time(rng: random.Random, trigger: str, at_start: dict, timing: dict | None,
               knobs: Knobs) -> float | None:
    """For a "random" kill: seconds after the start, uniform over this run's expected time (startup + the stages
    not done yet, heal scaled by its steps left)."""
    if trigger != "random":
        return None
    left = timing["startup"]
    for stage in STAGES:
        if stage not in at_start["markers"]:
            share = 1 - at_start["checkpoint"] / knobs.heal_steps if stage == "heal" else 1.0
            left += timing.get(stage, 0.0) * share
    return rng.uniform(0.1, 0.9) * left


def _wait_and_kill(proc: subprocess.Popen, work: Path, trigger: str, knobs: Knobs, at_start: dict,
                   kill_after: float | None) -> dict | None:
    began = time.monotonic()
    seen = set(_partials(work))  # leftovers of an earlier kill are not this run's saves
    delay = 0.1  # "heal": this long after a new checkpoint, i.e. between two checkpoints
    fire_at = None
    while proc.poll() is None:
        now = time.monotonic() - began
        if now > knobs.run_timeout_s:
            break
        if trigger == "random" and now >= kill_after:
            break
        if trigger == "save" and set(_partials(work)) - seen:
            break
        if trigger == "heal" and fire_at is None and _latest_checkpoint(work) > at_start["checkpoint"]:
            fire_at = now + delay
        if fire_at is not None and now >= fire_at:
            break
        time.sleep(knobs.poll_s)
    if proc.poll() is not None:
        return None
    proc.kill()
    proc.wait()
    state = _state(work)
    return {"at_s": round(time.monotonic() - began, 2), "stage": _stage(state),
            "saving": sorted(set(_partials(work)) - seen), "checkpoint_step": state["checkpoint"],
            "stages_done": sorted(state["markers"], key=STAGES.index)}


def _partials(work: Path) -> list[tuple[str, int]]:
    """(path, inode) of each `*.partial` inside the work folder (not the work folder itself)."""
    found = []
    for folder in (work, work / "stages", work / "heal", work / "heal" / "checkpoints"):
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            continue
        for entry in entries:
            if entry.name.endswith(".partial"):  # inode(): from the directory entry on Linux, no stat
                found.append((str(Path(entry.path).relative_to(work)), entry.inode()))
    return found


def _latest_checkpoint(work: Path) -> int:
    steps = [int(p.name.removeprefix("step-")) for p in (work / "heal" / "checkpoints").glob("step-*")
             if p.name.removeprefix("step-").isdigit() and (p / "state.pt").is_file()]
    return max(steps, default=0)


def _state(work: Path) -> dict:
    """Stage records and complete checkpoints, each with its file identity (inode, mtime): rewritten = changed."""
    def stamp(path: Path) -> tuple[int, int] | None:
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns

    markers = {s: stamp(work / "stages" / f"{s}.json") for s in STAGES if (work / "stages" / f"{s}.json").is_file()}
    checkpoints = {p.name: stamp(p / "state.pt") for p in (work / "heal" / "checkpoints").glob("step-*")
                   if p.name.removeprefix("step-").isdigit() and (p / "state.pt").is_file()}
    return {"markers": markers, "checkpoints": checkpoints, "checkpoint": _latest_checkpoint(work)}


def _stage(state: dict) -> str:
    undone = [s for s in STAGES if s not in state["markers"]]
    return undone[0] if undone else "finalize"


def _resumed(before: dict, after: dict, outcome: str, dest: Path) -> dict:
    """What a rerun did with the work it found: records and checkpoints rewritten (should be none), and for the run
    that finished the heal, the step its heal record says it resumed from. `outcome`: killed (by the next
    trigger), finished, failed."""
    record = {"found_stages": sorted(before["markers"], key=STAGES.index), "found_checkpoint": before["checkpoint"],
              "outcome": outcome,
              "stages_rewritten": sorted(s for s, v in before["markers"].items() if after["markers"].get(s, v) != v),
              "checkpoints_rewritten": sorted(c for c, v in before["checkpoints"].items()
                                              if after["checkpoints"].get(c, v) != v)}
    if outcome == "finished" and "heal" not in before["markers"]:
        heal = json.loads((dest / "stages" / "heal.json").read_text())
        record["heal_resumed_from"] = heal["resumed_from"] or 0
        record["heal_steps_run"] = heal["steps_run"]
    return record


def _check_files(work: Path, dest: Path) -> dict:
    """Open every file at a final name; -> counts and the files that do not read back whole."""
    markers = {p.stem for p in (work / "stages").glob("*.json")}
    checked, bad = 0, []
    for root, base in ((work, work), (dest, dest)):
        if not root.is_dir():
            continue
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            rel = path.relative_to(base)
            if any(part.endswith(".partial") for part in rel.parts):
                continue  # work in progress: never read by a rerun (it starts that write again)
            problem = _unreadable(path)
            checked += 1
            if problem is not None:
                bad.append({"path": str(path.relative_to(work.parent)), "error": problem,
                            "trusted": root == dest or _trusted(rel, markers)})
    return {"checked": checked, "half_written": bad}


def _trusted(rel: Path, markers: set[str]) -> bool:
    """Whether a rerun reads this file instead of writing it again."""
    top = rel.parts[0]
    if top in ("stages", "job.yaml"):
        return True
    if rel.parts[:2] == ("heal", "checkpoints"):
        return len(rel.parts) > 2 and rel.parts[2].removeprefix("step-").isdigit()
    folder_stage = {"measure": "measure", "pruned": "prune", "heal": "heal"}.get(top)
    return folder_stage in markers if folder_stage else "evaluate" in markers  # the top level: the finalize step


def _unreadable(path: Path) -> str | None:
    """None if the file reads back whole by its kind, else why not."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            load_file(path)
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix in (".yaml", ".yml"):
            yaml.safe_load(path.read_text())
        elif path.suffix == ".pt":
            import pickle

            import torch

            try:
                torch.load(path, weights_only=True)
            except pickle.UnpicklingError:  # holds more than tensors: our own file, so a full load is fine
                torch.load(path, weights_only=False)
        elif path.suffix == ".png":
            from PIL import Image

            with Image.open(path) as image:
                image.verify()
        elif path.stat().st_size == 0:
            return "empty"
    except Exception as err:  # noqa: BLE001 - any failure to read back is the finding
        return f"{type(err).__name__}: {str(err)[:200]}"
    return None


def _figures(kills: list[dict], reruns: list[dict], finished: dict, reference_out: Path, chain_out: Path) -> dict:
    from prunefusion.checkpoints import digest_files

    half = [f for k in kills for f in k["files"]["half_written"]]
    final = _check_files(chain_out.with_name(chain_out.name + ".partial"), chain_out)
    figures = {
        "kills": len(kills), "stage_per_kill": [k["stage"] + (f" (saving {k['saving'][0][0]})" if k["saving"] else "")
                                                for k in kills],
        "kill_details": kills, "reruns": reruns,
        "half_written_trusted": sum(f["trusted"] for f in half) + len(final["half_written"]),
        "half_written_rewritten_by_rerun": sum(not f["trusted"] for f in half),
        "resumed_runs": len(reruns), "resumed_runs_finished": sum(r["outcome"] == "finished" for r in reruns),
        "resumed_runs_killed_again": sum(r["outcome"] == "killed" for r in reruns),
        "resumed_runs_failed": sum(r["outcome"].startswith("failed") for r in reruns),
        "final_exit_code": finished["exit_code"],
        "rewritten_on_resume": sum(len(r["stages_rewritten"]) + len(r["checkpoints_rewritten"]) for r in reruns),
        "heal_steps_not_redone": sum(r["found_checkpoint"] for r in reruns if "heal" not in r["found_stages"]),
        "stages_not_redone": sum(len(r["found_stages"]) for r in reruns),
        "output_files_checked": final["checked"],
    }
    if chain_out.is_dir():
        ref, got = (json.loads((d / "manifest.json").read_text()) for d in (reference_out, chain_out))
        figures["weights_digest_reference"] = ref["weights_digest"][:16]
        figures["weights_digest_resumed"] = got["weights_digest"][:16]
        figures["manifest_digest_matches_weights"] = got["weights_digest"] == digest_files(
            sorted(chain_out.glob("*.safetensors")))
        figures["resumed_equals_uninterrupted"] = got["weights_digest"] == ref["weights_digest"]
        figures["held_out_perplexity"] = {"reference": ref["metrics"]["held_out_perplexity"],
                                          "resumed": got["metrics"]["held_out_perplexity"]}
        if not figures["resumed_equals_uninterrupted"]:
            figures["max_weight_difference"] = _max_difference(reference_out, chain_out)
    return figures


def _max_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    left, right = (load_file(next(d.glob("*.safetensors"))) for d in (a, b))
    return max(float((left[k].float() - right[k].float()).abs().max()) for k in left)


def _goals(f: dict) -> list[Goal]:
    goals = [Goal("0 half-written files at paths a rerun trusts (stage records, checkpoints, DIR)",
                  f["half_written_trusted"], f["half_written_trusted"] == 0),
             Goal("every resumed run finishes (or is killed again by the next trigger); none fails",
                  {k: f[f"resumed_runs_{k}"] for k in ("finished", "killed_again", "failed")},
                  f["resumed_runs_failed"] == 0 and f["resumed_runs_finished"] == 1 and f["final_exit_code"] == 0),
             Goal("a rerun redoes no finished stage and rewrites no checkpoint it found", f["rewritten_on_resume"],
                  f["rewritten_on_resume"] == 0)]
    if "resumed_equals_uninterrupted" in f:
        goals.append(Goal("resumed == uninterrupted (same weights digest)",
                          f"{f['weights_digest_resumed']} vs {f['weights_digest_reference']}",
                          f["resumed_equals_uninterrupted"] and f["manifest_digest_matches_weights"]))
    return goals


def _notes(f: dict) -> list[str]:
    notes = ["one chain: each rerun but the last is itself killed by the next trigger; the last runs to the end"]
    if f["half_written_rewritten_by_rerun"]:
        notes.append(f"{f['half_written_rewritten_by_rerun']} half-written file(s) inside an unfinished stage, "
                     "which the rerun writes again (see kill_details)")
    return notes
