"""Model registry: model name -> engine, built from the config through a table of engine kinds."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from prunefusion.server.config import ModelConfig
from prunefusion.server.engines.base import Engine, EngineUnavailableError, ModelInfo

log = logging.getLogger(__name__)


def _torch_engine(cfg: ModelConfig) -> Engine:
    from prunefusion.server.engines.torch_engine import TorchEngine, TorchEngineOptions

    return TorchEngine(cfg.name, TorchEngineOptions(
        path=str(cfg.resolved_path), device=cfg.device, dtype=cfg.dtype, max_batch_size=cfg.max_batch_size,
        max_queue=cfg.max_queue, max_new_tokens_limit=cfg.max_new_tokens_limit,
        default_max_new_tokens=cfg.default_max_new_tokens, trust_remote_code=cfg.trust_remote_code,
        context_length=cfg.context_length))


# Engine kinds, looked up by the `engine` key of a model's config. Modules are imported only when used, so a CPU
# host never imports vLLM unless a model asks for it.
ENGINE_FACTORIES: dict[str, Callable[[ModelConfig], Engine]] = {
    "torch": _torch_engine,
}


class ModelNotFoundError(LookupError):
    """No model of that name (mapped to NOT_FOUND)."""


def ensure_built(cfg: ModelConfig) -> None:
    """Build the model's recipe or compression job into its path if the directory is missing and the config names
    one."""
    from prunefusion.models.builds import build_if_missing

    build_if_missing(cfg.resolved_path, cfg.build, f"model {cfg.name}")


class ModelRegistry:
    def __init__(self, configs: list[ModelConfig]):
        self._configs = list(configs)
        self._engines: dict[str, Engine] = {}

    @property
    def default_name(self) -> str:
        return self._configs[0].name

    async def start(self) -> None:
        """Build missing default models, then load and warm up every engine (one at a time: memory)."""
        for cfg in self._configs:
            await asyncio.to_thread(ensure_built, cfg)
            engine = ENGINE_FACTORIES[cfg.engine](cfg)
            await engine.start()
            self._engines[cfg.name] = engine
            info = engine.info
            log.info("model %s ready: %s, %d layers, %s parameters, engine %s, digest %s", cfg.name, info.family,
                     info.num_layers, f"{info.num_parameters:,}", info.engine, info.weights_digest[:12])

    async def shutdown(self) -> None:
        await asyncio.gather(*(engine.shutdown() for engine in self._engines.values()))

    def get(self, name: str) -> Engine:
        """The engine for `name` ('' = the first configured model)."""
        name = name or self.default_name
        if name not in {c.name for c in self._configs}:
            raise ModelNotFoundError(f"model {name!r} is not served here; available: {[c.name for c in self._configs]}")
        engine = self._engines.get(name)
        if engine is None:
            raise EngineUnavailableError(f"model {name!r} is still loading")
        return engine

    def infos(self) -> list[ModelInfo]:
        return [self._engines[c.name].info for c in self._configs if c.name in self._engines]

    def healthy(self) -> bool:
        return len(self._engines) == len(self._configs) and all(e.stats().healthy for e in self._engines.values())
