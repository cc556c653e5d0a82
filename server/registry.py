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


def _transfusion_engine(cfg: ModelConfig):
    from prunefusion.server.engines.transfusion_engine import TransfusionEngine, TransfusionEngineOptions

    i = cfg.images
    return TransfusionEngine(cfg.name, TransfusionEngineOptions(
        path=str(cfg.resolved_path), device=cfg.device, dtype=cfg.dtype, max_batch_size=cfg.max_batch_size,
        max_queue=cfg.max_queue, max_wait_s=i.max_wait_ms / 1000, max_steps=i.max_steps,
        default_steps=i.default_steps, default_guidance_scale=i.default_guidance_scale, max_size=i.max_size,
        max_caption_tokens=min(cfg.max_new_tokens_limit, i.max_caption_tokens)))


def _vllm_engine(cfg: ModelConfig) -> Engine:
    from prunefusion.server.engines.vllm_engine import VllmEngine, VllmEngineOptions

    v = cfg.vllm
    return VllmEngine(cfg.name, VllmEngineOptions(
        path=str(cfg.resolved_path), device=cfg.device, dtype=cfg.dtype, max_batch_size=cfg.max_batch_size,
        max_queue=cfg.max_queue, max_new_tokens_limit=cfg.max_new_tokens_limit,
        default_max_new_tokens=cfg.default_max_new_tokens, trust_remote_code=cfg.trust_remote_code,
        context_length=cfg.context_length, kv_cache_memory_bytes=v.kv_cache_memory_bytes,
        gpu_memory_utilization=v.gpu_memory_utilization, tensor_parallel_size=v.tensor_parallel_size,
        enforce_eager=v.enforce_eager, max_num_batched_tokens=v.max_num_batched_tokens,
        enable_prefix_caching=v.enable_prefix_caching, seed=v.seed, engine_args=dict(v.engine_args)))


# Engine kinds, looked up by the `engine` key of a model's config, and the service each kind's models belong to.
# Modules are imported only when used, so a CPU host never imports vLLM unless a model asks for it.
ENGINE_FACTORIES: dict[str, Callable[[ModelConfig], Engine]] = {
    "torch": _torch_engine,
    "transfusion": _transfusion_engine,
    "vllm": _vllm_engine,
}
ENGINE_TASKS: dict[str, str] = {"torch": "text", "transfusion": "multimodal", "vllm": "text"}
SERVICE_OF_TASK = {"text": "TextGeneration", "multimodal": "Multimodal"}


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

    def _configs_for(self, task: str) -> list[ModelConfig]:
        return [c for c in self._configs if ENGINE_TASKS[c.engine] == task]

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

    def get(self, name: str, task: str = "text"):
        """The engine for `name` ('' = the first configured model of that task)."""
        configs = self._configs_for(task)
        if not name:
            if not configs:
                raise ModelNotFoundError(f"no {SERVICE_OF_TASK[task]} model is served here")
            name = configs[0].name
        if name not in {c.name for c in configs}:
            other = next((c for c in self._configs if c.name == name), None)
            if other is not None:
                service = SERVICE_OF_TASK[ENGINE_TASKS[other.engine]]
                raise ModelNotFoundError(f"model {name!r} is served by the {service} service, not "
                                         f"{SERVICE_OF_TASK[task]}")
            raise ModelNotFoundError(f"model {name!r} is not served here; available: {[c.name for c in configs]}")
        engine = self._engines.get(name)
        if engine is None:
            raise EngineUnavailableError(f"model {name!r} is still loading")
        return engine

    def engines(self, task: str) -> list:
        return [self._engines[c.name] for c in self._configs_for(task) if c.name in self._engines]

    def infos(self, task: str = "text") -> list[ModelInfo]:
        return [engine.info for engine in self.engines(task)]

    def healthy(self) -> bool:
        return len(self._engines) == len(self._configs) and all(e.stats().healthy for e in self._engines.values())
