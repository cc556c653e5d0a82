"""Where built models and caches live: $PRUNEFUSION_HOME, default ~/.cache/prunefusion."""

from __future__ import annotations

import os
import re
from pathlib import Path

ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


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


def expand_env(text: str, what: str) -> str:
    """Replace each `${VAR}` in `text` with the environment's value (a secret injected as an env var, e.g. a Redis
    URL with its password); an unset VAR is a ValueError naming `what` and VAR."""
    def value(match: re.Match) -> str:
        name = match.group(1)
        if name not in os.environ:
            raise ValueError(f"{what}: ${{{name}}} is not set in the environment")
        return os.environ[name]

    return ENV_REFERENCE.sub(value, text)
