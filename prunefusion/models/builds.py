"""What a model config's `build:` names: a recipe (`prunefusion models build`) or a compression job (`compress run`:
a job packaged in compression/jobs/ by its name, or a path to a job YAML)."""

from __future__ import annotations

import logging
from pathlib import Path

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


def check_build_name(name: str) -> None:
    from prunefusion.models.recipes import RECIPES

    if name not in RECIPES and name not in transfusion_builds() and job_file(name) is None:
        raise ValueError(f"unknown build {name!r}: neither an LM recipe {sorted(RECIPES)}, a Transfusion build "
                         f"{sorted(transfusion_builds())}, a compression job {sorted(packaged_jobs())} nor a job "
                         "YAML file")


def build_if_missing(path: Path, name: str | None, what: str) -> None:
    """Build `name` into `path` unless it already holds a checkpoint (config.json). An empty directory (e.g. a
    freshly mounted volume) is built into; any other existing directory is refused, never built over."""
    if (path / "config.json").is_file() or name is None:
        return
    empty = path.is_dir() and not any(path.iterdir())
    if path.exists() and not empty:
        raise FileExistsError(f"{what}: {path} exists but holds no config.json; not building over it")
    log.info("%s: %s is missing; building %r (one-time)", what, path, name)
    if empty:
        path.rmdir()  # builds rename their finished directory into place
    build(name, path)


def build(name: str, out: Path, *, force: bool = False) -> dict:
    """Make `out` from the recipe or job `name`; return its manifest."""
    from prunefusion.models.recipes import RECIPES

    check_build_name(name)
    if name in transfusion_builds():
        from prunefusion.transfusion.build import build_transfusion

        return build_transfusion(transfusion_builds()[name], out, force=force)
    if name in RECIPES:
        from prunefusion.models.build import build_model

        return build_model(name, out, force=force).manifest
    try:
        from prunefusion.compression.job import run_job
    except ImportError as err:  # pragma: no cover - the compress extra is missing
        raise RuntimeError(f"building {name!r} needs the compress extra: pip install 'prunefusion[compress]'") from err
    return run_job(job_file(name), out, force=force)
