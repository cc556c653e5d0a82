"""Start-up steps of `serve` that need no server object: the cache's URL and connection, and the models' builds
(checked up front with `--no-build`, else run before each missing model loads)."""

from __future__ import annotations

import asyncio

from prunefusion.home import expand_env, expand_path
from prunefusion.server.cache.service import CacheSettings, ResponseCache
from prunefusion.server.config import CacheConfig, ConfigError, ModelConfigBase


def cache_url(cfg: CacheConfig) -> str | None:
    """cache.url with its `${VAR}`s from the environment (ConfigError if one is unset)."""
    try:
        return None if cfg.url is None else expand_env(cfg.url, "cache.url")
    except ValueError as err:
        raise ConfigError(str(err)) from None


async def open_cache(cfg: CacheConfig) -> ResponseCache:
    """The response cache of the config; disabled -> a pass-through cache. Starting it never fails the server:
    an unreachable Redis is handled fail-open per request."""
    if not cfg.enabled:
        return ResponseCache(None)
    from prunefusion.server.cache.backend import connect

    backend = await asyncio.to_thread(
        connect, cache_url(cfg), expand_path(cfg.data_dir), timeout_s=cfg.timeout_ms / 1000,
        backoff_initial_s=cfg.backoff_initial_seconds, backoff_max_s=cfg.backoff_max_seconds,
        embedded_maxmemory_mb=cfg.embedded_maxmemory_mb)
    settings = CacheSettings(namespace=cfg.namespace, ttl_seconds=cfg.ttl_seconds, ttl_jitter=cfg.ttl_jitter,
                             max_entry_bytes=cfg.max_entry_bytes, lock_ttl_seconds=cfg.lock_ttl_seconds)
    return ResponseCache(backend, settings)


def build_missing(cfg: ModelConfigBase) -> None:
    """Build the model's recipe or compression job into its path if the directory is missing and the config names
    one (blocking: minutes for the default models, once)."""
    from prunefusion.models.builds import build_if_missing

    build_if_missing(cfg.resolved_path, cfg.build, f"model {cfg.name}")


def is_built(cfg: ModelConfigBase) -> bool:
    from prunefusion.models.builds import is_built as built

    return built(cfg.resolved_path)


def check_built(models: list[ModelConfigBase]) -> None:
    """`--no-build`: every model's directory must hold a checkpoint; else a ConfigError naming each missing one and
    the command that builds it."""
    from prunefusion.models.builds import build_command

    missing = [m for m in models if not is_built(m)]
    if missing:
        lines = [f"model {m.name}: {m.resolved_path} holds no model (no config.json); "
                 + (f"build it with: {build_command(m.build, m.resolved_path)}" if m.build else
                    "copy a checkpoint there (config.json, weights, tokenizer) or give the model a build:")
                 for m in missing]
        raise ConfigError("server.build_missing_models is off (serve --no-build), and models are missing:\n  "
                          + "\n  ".join(lines))
