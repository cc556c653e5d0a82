"""Where built models and caches live: $PRUNEFUSION_HOME, default ~/.cache/prunefusion."""

from __future__ import annotations

import os
from pathlib import Path


def prunefusion_home() -> Path:
    return Path(os.environ.get("PRUNEFUSION_HOME") or Path.home() / ".cache" / "prunefusion").expanduser()


def default_model_dir(name: str) -> Path:
    return prunefusion_home() / "models" / name
