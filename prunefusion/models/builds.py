"""What a model config's `build:` names: a recipe (`prunefusion models build`) or a compression job (`compress run`:
a job packaged in compression/jobs/ by its name, or a path to a job YAML)."""

from __future__ import annotations

import logging
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from prunefusion.lazy import resolve

log = logging.getLogger(__name__)


def packaged_jobs() -> dict[str, Path]:
    from prunefusion.compression import job

    jobs_dir = Path(job.__file__).parent / "jobs"  # installed or editable: beside the job module
    return {p.stem: p for p in sorted(jobs_dir.glob("*.yaml"))}


def job_file(name: str) -> Path | None:
    """The job a build name refers to, or None when it is not a job."""
    if name in packaged_jobs():
        return packaged_jobs()[name]
    path = Path(name).expanduser()
    return path if path.suffix in (".yaml", ".yml") and path.is_file() else None


def transfusion_builds() -> dict[str, str]:
    """Build names of the Transfusion recipes: `transfusion` (the default recipe), `transfusion-RECIPE`."""
    from prunefusion.transfusion.build import RECIPES

    return {("transfusion" if r == "default" else f"transfusion-{r}"): r for r in RECIPES}


@dataclass(frozen=True)
class BuildKind:
    """One kind of thing a `build:` name can be: which names it knows and how it builds one into a directory."""

    description: str
    names: Callable[[], list[str]]  # for error messages
    matches: Callable[[str], bool]
    build: Callable[[str, Path, bool], object]  # (name, out, force) -> the build's manifest
    command: Callable[[str, Path], list[str]]  # (name, out) -> the command line that builds it (argv)


def _build_lm(name: str, out: Path, force: bool):
    from prunefusion.models.build import build_model

    return build_model(name, out, force=force).manifest


def _build_transfusion(name: str, out: Path, force: bool):
    from prunefusion.transfusion.build import build_transfusion

    return build_transfusion(transfusion_builds()[name], out, force=force)


def _run_job(name: str, out: Path, force: bool):
    try:
        from prunefusion.compression.job import run_job
    except ImportError as err:  # pragma: no cover - the compress extra is missing
        raise RuntimeError(f"building {name!r} needs the compress extra: pip install 'prunefusion[compress]'") from err
    return run_job(job_file(name), out, force=force)


def _lm_recipes() -> list[str]:
    from prunefusion.models.recipes import RECIPES

    return sorted(RECIPES)


def _lm_command(name: str, out: Path) -> list[str]:
    return ["prunefusion", "models", "build", "--recipe", name, "--out", str(out), "--no-pruned"]


def _transfusion_command(name: str, out: Path) -> list[str]:
    return ["prunefusion", "models", "build", "transfusion", "--recipe", transfusion_builds()[name], "--out", str(out)]


def _job_command(name: str, out: Path) -> list[str]:
    return ["prunefusion", "compress", "run", str(job_file(name)), "--out", str(out)]


BUILD_KINDS = (
    BuildKind("an LM recipe", _lm_recipes, lambda name: name in _lm_recipes(), _build_lm, _lm_command),
    BuildKind("a Transfusion build", lambda: sorted(transfusion_builds()), lambda name: name in transfusion_builds(),
              _build_transfusion, _transfusion_command),
    BuildKind("a compression job", lambda: sorted(packaged_jobs()) + ["JOB.yaml"],
              lambda name: job_file(name) is not None, _run_job, _job_command),
    BuildKind("an ONNX export", lambda: resolve("prunefusion.models.onnx_build:names")(),
              lambda name: resolve("prunefusion.models.onnx_build:matches")(name),
              lambda *a: resolve("prunefusion.models.onnx_build:build_onnx")(*a),
              lambda *a: resolve("prunefusion.models.onnx_build:onnx_command")(*a)),
)


def build_kind(name: str) -> BuildKind:
    kind = next((k for k in BUILD_KINDS if k.matches(name)), None)
    if kind is None:
        known = "; ".join(f"{k.description} {k.names()}" for k in BUILD_KINDS)
        raise ValueError(f"unknown build {name!r}: not one of: {known}")
    return kind


def check_build_name(name: str) -> None:
    build_kind(name)


def is_built(path: Path) -> bool:
    """`path` holds a checkpoint (its config.json)."""
    return (Path(path) / "config.json").is_file()


def build_command(name: str, out: Path) -> str:
    """The shell command that builds `name` into `out` (what `serve --no-build` tells the operator to run)."""
    return shlex.join(build_kind(name).command(name, Path(out)))


def build_if_missing(path: Path, name: str | None, what: str) -> None:
    """Build `name` into `path` unless it already holds a checkpoint (config.json). An empty directory (e.g. a
    freshly mounted volume) is built into; any other existing directory is refused, never built over."""
    if is_built(path) or name is None:
        return
    empty = path.is_dir() and not any(path.iterdir())
    if path.exists() and not empty:
        raise FileExistsError(f"{what}: {path} exists but holds no config.json; not building over it")
    log.info("%s: %s is missing; building %r (one-time)", what, path, name)
    if empty:
        path.rmdir()  # builds rename their finished directory into place
    build(name, path)


def build(name: str, out: Path, *, force: bool = False):
    """Make `out` from the recipe or job `name`; return its manifest."""
    return build_kind(name).build(name, Path(out), force)
