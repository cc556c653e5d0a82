"""`prunefusion pipeline JOB.yaml --out DIR`: compress, serve the original beside the result, load-test both, report.

    prunefusion pipeline compression/jobs/tiny-lm-angular-25.yaml --out runs/pipeline-tiny-lm
    prunefusion pipeline compression/jobs/minilm-2of6.yaml --out runs/pipeline-minilm --screenshot

Stages, each skipped when its output is current:
1. compress: the compression job (filter -> measure -> prune -> heal -> merge -> evaluate) into DIR/model, resumable
   as `compress run` is. Current when DIR/model's manifest records this job (its `loadtest` section aside) and the
   source's weights digest.
2. loadtest: `prunefusion serve` in its own process with the original and the result side by side (DIR/serve.yaml:
   models `original` and `pruned`), then `prunefusion loadtest` at the job's `loadtest.concurrency` (closed loop,
   `loadtest.rounds` rounds alternating the models' order), into DIR/loadtest. Causal LMs get GenerateStream calls,
   encoders Embed calls. Current when DIR/loadtest/inputs.json names the same weights and the same `loadtest`.
3. report: DIR/report.html and DIR/report.md (always rewritten: it only reads the other stages' files), and with
   --screenshot DIR/report.png rendered by headless Chromium (which also checks that every figure loaded).

The job file's optional `loadtest:` section (compression/job.py `LoadtestSpec`): concurrency, duration_s, warmup_s,
rounds, prompt_words, max_new_tokens, texts_per_request, max_batch_size.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from prunefusion.atomic import partial_dir, publish, write_text_atomic
from prunefusion.compression.job import JobSpec, load_job

log = logging.getLogger(__name__)

ORIGINAL, RESULT = "original", "pruned"  # the served models' names
SERVED_ENGINE = {"causal-lm": "torch", "encoder": "torch-encoder"}  # model kind -> engine serving it


@dataclass
class Pipeline:
    job_path: Path
    out: Path
    device: str = "cpu"
    restart: bool = False
    rerun: set[str] = field(default_factory=set)  # stages to run even when current
    screenshot: bool = False
    spec: JobSpec = field(init=False)
    ran: dict[str, str] = field(default_factory=dict)  # stage -> "ran" | "current" | a reason it was skipped
    seconds: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.spec = load_job(self.job_path)

    @property
    def model_dir(self) -> Path:
        return self.out / "model"

    @property
    def loadtest_dir(self) -> Path:
        return self.out / "loadtest"

    def manifest(self):
        from prunefusion.compression.records import JobManifest

        return JobManifest.load(self.model_dir / "manifest.json")

    def kind_name(self) -> str:
        from prunefusion.model_kinds import checkpoint_kind

        return checkpoint_kind(self.model_dir).name


def compress_current(p: Pipeline) -> bool:
    """The model's manifest records this job (its `loadtest` aside) and the source still has the weights it had."""
    from prunefusion.checkpoints import digest_files, weight_files

    path = p.model_dir / "manifest.json"
    if not path.is_file():
        return False
    manifest = json.loads(path.read_text())
    recorded = {k: v for k, v in manifest["job"].items() if k != "loadtest"}
    if recorded != json.loads(json.dumps(p.spec.compression_fields())):
        return False
    source = p.spec.model_path
    return source.is_dir() and digest_files(weight_files(source)) == manifest["source"]["weights_digest"]


def _compress(p: Pipeline) -> str:
    from prunefusion.compression.job import run_job

    run_job(p.job_path, p.model_dir, device=p.device, restart=p.restart, force=p.model_dir.exists())
    return "ran"


def loadtest_inputs(p: Pipeline) -> dict:
    """What the load test's results depend on: both models' weights and the job's `loadtest` section."""
    m = p.manifest()
    return {"original": m.source.weights_digest, "result": m.weights_digest, "loadtest": p.spec.loadtest.model_dump()}


def loadtest_current(p: Pipeline) -> bool:
    stamp = p.loadtest_dir / "inputs.json"
    return stamp.is_file() and json.loads(stamp.read_text()) == json.loads(json.dumps(loadtest_inputs(p)))


def serve_config(p: Pipeline) -> dict:
    """The server config: the original and the result side by side, no cache (a load test bypasses it), no
    QualityFilter, no metrics port (two pipelines may run at once)."""
    model = {"engine": SERVED_ENGINE[p.kind_name()], "max_batch_size": p.spec.loadtest.max_batch_size}
    return {"server": {"host": "127.0.0.1", "metrics_port": None, "drain_delay_seconds": 0},
            "cache": {"enabled": False}, "quality": {"enabled": False},
            "models": [{"name": ORIGINAL, "path": str(p.spec.model_path), **model},
                       {"name": RESULT, "path": str(p.model_dir.resolve()), **model}]}


def loadtest_arguments(p: Pipeline, out: Path) -> argparse.Namespace:
    """`prunefusion loadtest`'s own options (its parser, so its defaults and checks hold) for the job's section."""
    from prunefusion.loadtest.run import register

    t = p.spec.loadtest
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    return parser.parse_args(["loadtest", "--models", ORIGINAL, RESULT, "--concurrency", *map(str, t.concurrency),
                              "--duration", str(t.duration_s), "--warmup", str(t.warmup_s), "--rounds", str(t.rounds),
                              "--prompt-words", str(t.prompt_words), "--max-new-tokens", str(t.max_new_tokens),
                              "--embed-texts", str(t.texts_per_request), "--out", str(out)])


def _loadtest(p: Pipeline) -> str:
    from prunefusion.loadtest.run import run_against
    from prunefusion.loadtest.server_process import ServerProcess

    config = p.out / "serve.yaml"
    write_text_atomic(config, yaml.safe_dump(serve_config(p), sort_keys=False))
    work = partial_dir(p.loadtest_dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    args = loadtest_arguments(p, work)
    print(f"serving {ORIGINAL} and {RESULT} ({config}; log {work / 'server.log'})", flush=True)
    with ServerProcess(config, log=work / "server.log") as server:
        run_against(server.target, args)
    write_text_atomic(work / "inputs.json", json.dumps(loadtest_inputs(p), indent=1) + "\n")
    publish(work, p.loadtest_dir)
    return "ran"


def _report(p: Pipeline) -> str:
    from prunefusion.pipeline.report import write_report

    write_report(p)
    if p.screenshot:
        from prunefusion.pipeline.browser import render

        page = render(p.out / "report.html", p.out / "report.png")
        if page.failed:
            raise RuntimeError(f"report.html: figures failed to load in Chromium: {page.failed}")
    return "ran"


@dataclass(frozen=True)
class Stage:
    run: Callable[[Pipeline], str]
    current: Callable[[Pipeline], bool]


STAGES: dict[str, Stage] = {
    "compress": Stage(_compress, compress_current),
    "loadtest": Stage(_loadtest, loadtest_current),
    "report": Stage(_report, lambda p: False),  # cheap, and reads only the others' files: always rewritten
}


def run_pipeline(p: Pipeline) -> Pipeline:
    unknown = p.rerun - set(STAGES)
    if unknown:
        raise ValueError(f"--rerun: unknown stage(s) {sorted(unknown)}; the stages are {list(STAGES)}")
    p.out.mkdir(parents=True, exist_ok=True)
    record = p.out / "pipeline.json"
    if record.is_file():  # how long the stages this run skips took when they last ran
        p.seconds = json.loads(record.read_text())["seconds"]
    for name, stage in STAGES.items():
        if name not in p.rerun and stage.current(p):
            p.ran[name] = "current"
            print(f"stage {name}: current, skipped", flush=True)
            continue
        print(f"stage {name} ...", flush=True)
        started = time.perf_counter()
        p.ran[name] = stage.run(p)
        p.seconds[name] = round(time.perf_counter() - started, 1)
        write_text_atomic(record, json.dumps({"stages": p.ran, "seconds": p.seconds}, indent=1) + "\n")
    return p


def register(subparsers) -> None:
    parser = subparsers.add_parser("pipeline", help="compress a model, serve it beside the original, load-test "
                                   "both, write one report", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job", help="the compression job file (YAML), with an optional loadtest: section")
    parser.add_argument("--out", required=True, help="output directory (model/, loadtest/, report.html)")
    parser.add_argument("--device", default="cpu", help="torch device for the compression job (default: cpu)")
    parser.add_argument("--restart", action="store_true", help="discard an unfinished compression run")
    parser.add_argument("--rerun", nargs="+", default=[], metavar="STAGE",
                        help=f"run these stages even when current ({', '.join(STAGES)})")
    parser.add_argument("--screenshot", action="store_true",
                        help="render report.png with headless Chromium and check every figure loaded")

    def run(args: argparse.Namespace) -> int:
        job = Path(args.job)
        if not job.is_file():
            raise FileNotFoundError(f"job file {job} not found")
        p = run_pipeline(Pipeline(job, Path(args.out), args.device, args.restart, set(args.rerun), args.screenshot))
        print(f"report: {p.out / 'report.html'} (and report.md)")
        return 0

    def checked(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except RuntimeError as err:  # the server or a locust run failed, a figure did not load
            print(f"error: {err}", file=sys.stderr)
            return 2

    parser.set_defaults(func=checked)
