"""Model registry: model name -> a started engine. The front ends' one way to a model.

Engine kinds are the config's table (server/config.py: one config model per kind, naming its engine class); the
service a model answers comes from its engine class (`task`). Text engines are registered behind the response
cache (`CachedEngine`), so every front end gets caching by asking for a model. Building missing models is not the
registry's business: the app does it before a model loads.
"""

from __future__ import annotations

import asyncio
import logging

from prunefusion.lazy import resolve
from prunefusion.server.cache.service import CachedEngine, ResponseCache
from prunefusion.server.config import ModelConfigBase
from prunefusion.server.engines.base import EngineUnavailableError, ModelInfo, ServingEngine
from prunefusion.server.guard import echo

log = logging.getLogger(__name__)

SERVICE_OF_TASK = {"text": "TextGeneration", "multimodal": "Multimodal", "embedding": "Embeddings"}


class ModelNotFoundError(LookupError):
    """No model of that name (mapped to NOT_FOUND)."""


def engine_class(cfg: ModelConfigBase) -> type[ServingEngine]:
    """The engine class a model config names ("module:Class"), imported now: a CPU host never imports vLLM's
    adapter unless a model asks for it (and the adapter imports vLLM only when it starts)."""
    return resolve(cfg.engine_class)


class ModelRegistry:
    def __init__(self, configs: list[ModelConfigBase]):
        self._configs = list(configs)
        self._tasks = {c.name: engine_class(c).task for c in self._configs}
        self._engines: dict[str, ServingEngine] = {}
        self._states: dict[str, str] = {c.name: "waiting to load" for c in self._configs}  # until it serves

    def set_state(self, name: str, state: str) -> None:
        """What a model not yet serving is doing ("waiting to be built", "building", "loading"): its callers hear it."""
        self._states[name] = state

    @property
    def tasks(self) -> set[str]:
        """The tasks ("text", "multimodal") some configured model serves: the services worth registering."""
        return set(self._tasks.values())

    async def load(self, cfg: ModelConfigBase, cache: ResponseCache) -> ServingEngine:
        """Start the model's engine (load and warm up) and serve it."""
        if getattr(cfg, "trust_remote_code", False):
            log.warning("model %s: trust_remote_code is on: Python code shipped in %s runs in this server", cfg.name,
                        cfg.resolved_path)
        engine = engine_class(cfg)(cfg)
        await engine.start()
        if engine.task == "text":
            engine = CachedEngine(engine, cache)
        self._engines[cfg.name] = engine
        self._states.pop(cfg.name, None)
        info = engine.info
        log.info("model %s ready: %s, %d layers, %s parameters, engine %s, digest %s", cfg.name, info.family,
                 info.num_layers, f"{info.num_parameters:,}", info.engine, info.weights_digest[:12])
        return engine

    async def shutdown(self) -> None:
        """Stop every engine: running requests end with FinishReason.CANCELLED."""
        await asyncio.gather(*(engine.shutdown() for engine in self._engines.values()))

    def _names(self, task: str) -> list[str]:
        return [c.name for c in self._configs if self._tasks[c.name] == task]

    def get(self, name: str, task: str = "text"):
        """The engine for `name` ('' = the first configured model of that task)."""
        names = self._names(task)
        if not name:
            if not names:
                raise ModelNotFoundError(f"no {SERVICE_OF_TASK[task]} model is served here")
            name = names[0]
        if name not in names:
            if name in self._tasks:
                raise ModelNotFoundError(f"model {echo(name)} is served by the {SERVICE_OF_TASK[self._tasks[name]]} "
                                         f"service, not {SERVICE_OF_TASK[task]}")
            raise ModelNotFoundError(f"model {echo(name)} is not served here; available: {names}")
        engine = self._engines.get(name)
        if engine is None:
            raise EngineUnavailableError(f"model {name!r} is not ready yet ({self._states[name]}); "
                                         f"the {SERVICE_OF_TASK[task]} health status turns SERVING when it is")
        return engine

    def model_for(self, service: str, name: str) -> str:
        """The model a call to `service` ("prunefusion.v1.Multimodal") asking for `name` will use ('' = the first)."""
        task = next((t for t, s in SERVICE_OF_TASK.items() if service.endswith(f".{s}")), None)
        names = self._names(task) if task else []
        return name or (names[0] if names else "")

    def engines(self, task: str) -> list:
        return [self._engines[n] for n in self._names(task) if n in self._engines]

    def infos(self, task: str = "text") -> list[ModelInfo]:
        return [engine.info for engine in self.engines(task)]

    def ready(self, task: str) -> bool:
        """Every model of `task` loaded, and healthy: its service reports SERVING."""
        names = self._names(task)
        return all(n in self._engines and self._engines[n].stats().healthy for n in names)
