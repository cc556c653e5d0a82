"""Where built models and caches live: $PRUNEFUSION_HOME, default ~/.cache/prunefusion."""

from __future__ import annotations

import os
from pathlib import Path


def prunefusion_home() -> Path:
    return Path(os.environ.get("PRUNEFUSION_HOME") or Path.home() / ".cache" / "prunefusion").expanduser()


def default_model_dir(name: str) -> Path:
    return prunefusion_home() / "models" / name


def expand_path(path: str) -> Path:
    """Expand `${VAR}` (with ${PRUNEFUSION_HOME} defaulting to ~/.cache/prunefusion) and `~`."""
    env = {**os.environ, "PRUNEFUSION_HOME": str(prunefusion_home())}
    for key, value in env.items():
        path = path.replace("${" + key + "}", value)
    return Path(path).expanduser()
