"""Wire the gRPC server: servicers, health, reflection, model registry, graceful drain on SIGTERM.

Start-up order: bind the port (health NOT_SERVING), open the cache, load the models already built, then build each
missing one (its config's `build:`, a one-time step of `serve`, done here, before its engine loads) and load it. A
model answers as soon as it is loaded; health is per service (TextGeneration SERVING once all its models are loaded,
Multimodal once its own are, the overall "" once every model is), and a call for a model not ready yet is
UNAVAILABLE saying what it is waiting for. With `server.build_missing_models: false` (`serve --no-build`) a missing
model stops the start at once, naming its directory and the command that builds it.

Every call first meets the request guard (server/guard.py): parsed and bounded there, refused as INVALID_ARGUMENT
before any work. Drain (SIGTERM): health NOT_SERVING at once, the port serves on for `drain_delay_seconds`, then
stops accepting; in-flight calls get `drain_seconds`, after which running streams end with a final
FINISH_REASON_CANCELLED chunk instead of being cut.

Security (README, "Security"): with `server.auth` one interceptor checks API keys on every call but health; with
`server.tls` the port speaks TLS (mutual with a client CA); `server.health_port` adds a plaintext health-only port.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import time

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from prunefusion.server.auth.interceptor import AccessControl
from prunefusion.server.auth.keys import KeySource
from prunefusion.server.cache.service import ResponseCache
from prunefusion.server.config import AppConfig, ConfigError
from prunefusion.server.guard import RequestBounds, RequestGuard
from prunefusion.server.health import DrainableHealth
from prunefusion.server.metrics import start_metrics_server
from prunefusion.server.registry import SERVICE_OF_TASK as TASK_SERVICES
from prunefusion.server.registry import ModelRegistry
from prunefusion.server.servicers.embeddings import EmbeddingsServicer
from prunefusion.server.servicers.multimodal import MultimodalServicer
from prunefusion.server.servicers.text_generation import TextGenerationServicer
from prunefusion.server.startup import build_missing, cache_url, check_built, is_built, open_cache
from prunefusion_client.v1 import (
    embeddings_pb2_grpc,
    multimodal_pb2_grpc,
    quality_filter_pb2,
    quality_filter_pb2_grpc,
    text_generation_pb2,
    text_generation_pb2_grpc,
)

log = logging.getLogger(__name__)

# the service each task's models answer, as registered (health and reflection list exactly the served ones)
# (the registry's names, looked up in the compiled protos so a renamed service fails at import)
PROTO_PACKAGE = text_generation_pb2.DESCRIPTOR.package
SERVICE_OF_TASK = {task: descriptor_pool.Default().FindServiceByName(f"{PROTO_PACKAGE}.{name}").full_name
                   for task, name in TASK_SERVICES.items()}
QUALITY_SERVICE = quality_filter_pb2.DESCRIPTOR.services_by_name["QualityFilter"].full_name
FLUSH_SECONDS = 2.0  # after the drain: how long the streams' final CANCELLED chunks get to go out


def _status(serving: bool):
    return health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING


class PrunefusionServer:
    """start() binds the port first (health NOT_SERVING), then loads the models, then reports SERVING."""

    def __init__(self, config: AppConfig):
        self.config = config
        self.registry = ModelRegistry(config.models)
        self.health = DrainableHealth()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.cache = ResponseCache(None)
        self._metrics_http = None
        self._server: grpc.aio.Server | None = None
        self._stopped = asyncio.Event()
        self._started = asyncio.Event()  # set when start() has returned or failed
        self._stopping = False
        self._health_watch: asyncio.Task | None = None
        self._serving: dict[str, bool] = {}  # each service's reported health
        self._loaded = False  # start-up has loaded every model
        self._quality = None
        self._health_server: grpc.aio.Server | None = None
        self.health_port: int | None = None
        self.access: AccessControl | None = None
        self.http = None  # the OpenAI-compatible front end (server/openai/), with server.http_port
        self.http_port: int | None = None
        self._key_source: KeySource | None = None
        self._key_watch: asyncio.Task | None = None
        self._key_signature: tuple | None = None
        # the services this server answers (health and reflection list exactly these): a service with no model
        # configured is not registered, so it is UNIMPLEMENTED rather than SERVING with nothing behind it
        self.services = tuple(SERVICE_OF_TASK[t] for t in SERVICE_OF_TASK if t in self.registry.tasks) + (
            (QUALITY_SERVICE,) if config.quality.enabled else ())

    async def _set_health(self, serving: bool) -> None:
        for service in ("", *self.services):
            self._serving[service] = serving
            await self.health.set(service, _status(serving))

    def _statuses(self) -> dict[str, bool]:
        """Each service's health now: a model service is SERVING when all its models are loaded and healthy, the
        quality filter while its workers can start, the overall "" when start-up is done and every service is."""
        serving = {SERVICE_OF_TASK[task]: self.registry.ready(task) for task in SERVICE_OF_TASK
                   if SERVICE_OF_TASK[task] in self.services}
        if self._quality is not None:
            serving[QUALITY_SERVICE] = self._quality.healthy()
        serving[""] = self._loaded and all(serving.values())
        return serving

    async def _update_health(self) -> None:
        for service, serving in self._statuses().items():
            if serving != self._serving.get(service):
                if service in self._serving:
                    level = logging.INFO if serving or not self._loaded else logging.WARNING
                    log.log(level, "health: %s %s", service or "(overall)", "SERVING" if serving else "NOT_SERVING")
                self._serving[service] = serving
                await self.health.set(service, _status(serving))

    async def start(self) -> None:
        try:
            await self._start()
        finally:
            self._started.set()

    def request_bounds(self) -> RequestBounds:
        cfg = self.config.server
        return RequestBounds({
            SERVICE_OF_TASK["text"]: cfg.max_text_request_kb << 10,
            SERVICE_OF_TASK["multimodal"]: cfg.max_image_request_mb << 20,
            SERVICE_OF_TASK["embedding"]: cfg.max_text_request_kb << 10,
            QUALITY_SERVICE: self.config.quality.max_batch_bytes + (1 << 20),  # + ids, options, framing
        })

    async def _start(self) -> None:
        cfg = self.config.server
        if not cfg.build_missing_models:
            check_built(self.config.models)
        if self.config.cache.enabled:
            cache_url(self.config.cache)  # an unset variable stops the start now, not after the port is bound
        limit = cfg.max_message_mb * 1024 * 1024
        bounds = self.request_bounds()
        receive_limit = min(limit, max(bounds.by_service.values()))  # what gRPC decompresses at most
        logging.getLogger("prunefusion.server.requests").setLevel(logging.INFO if cfg.log_requests else logging.WARNING)
        interceptors = [RequestGuard(bounds), *self._access_control()]
        self._server = grpc.aio.server(interceptors=interceptors, options=[
            ("grpc.max_receive_message_length", receive_limit), ("grpc.max_send_message_length", limit),
            ("grpc.keepalive_time_ms", 30_000), ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.http2.max_pings_without_data", 0), ("grpc.keepalive_permit_without_calls", 1),
        ])
        if SERVICE_OF_TASK["text"] in self.services:
            text_generation_pb2_grpc.add_TextGenerationServicer_to_server(
                TextGenerationServicer(self.registry, expose_paths=cfg.expose_paths), self._server)
        if SERVICE_OF_TASK["multimodal"] in self.services:
            multimodal_pb2_grpc.add_MultimodalServicer_to_server(
                MultimodalServicer(self.registry, expose_paths=cfg.expose_paths), self._server)
        if SERVICE_OF_TASK["embedding"] in self.services:
            embeddings_pb2_grpc.add_EmbeddingsServicer_to_server(
                EmbeddingsServicer(self.registry, expose_paths=cfg.expose_paths), self._server)
        if self.config.quality.enabled:
            from prunefusion.server.servicers.quality_filter import QualityFilterServicer

            self._quality = QualityFilterServicer(self.config.quality)
            quality_filter_pb2_grpc.add_QualityFilterServicer_to_server(self._quality, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection((*self.services, health.SERVICE_NAME, reflection.SERVICE_NAME),
                                            self._server)
        await self._set_health(False)
        self.port = self._bind(self._server, cfg.host, cfg.port)
        await self._server.start()
        if self._key_source is not None and self._key_source.file is not None:  # reloads while models load too
            self._key_watch = asyncio.create_task(self._watch_keys(cfg.auth.reload_seconds))
        log.info("listening on %s:%d (%s; NOT_SERVING until models are ready)", cfg.host, self.port, self._security())
        if cfg.health_port is not None:
            self._health_server = grpc.aio.server()
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_server)
            host = cfg.health_host or cfg.host
            self.health_port = self._bind(self._health_server, host, cfg.health_port, plaintext=True)
            await self._health_server.start()
            log.info("health (grpc.health.v1 only, plaintext) on %s:%d", host, self.health_port)
        if cfg.http_port is not None:
            await self._start_http()
        if cfg.metrics_port is not None:
            allowed = None
            if cfg.auth is not None and cfg.auth.metrics_requires_key:
                allowed = lambda header: self.access.authenticate([header] if header else [])  # noqa: E731
            self._metrics_http, _ = start_metrics_server(cfg.metrics_host, cfg.metrics_port, allowed)
            self.metrics_port = self._metrics_http.server_port
            log.info("metrics on http://%s:%d/metrics%s", cfg.metrics_host, self.metrics_port,
                     " (API key required)" if allowed else "")
        self.cache = await open_cache(self.config.cache)
        await self._update_health()  # the quality filter serves from here on
        self._health_watch = asyncio.create_task(self._watch_health())
        await self._load_models()
        if self._stopped.is_set() or self._stopping:  # SIGTERM arrived while loading
            return
        # what start-up made (torch, the models, the tokenizers) stays for the process's life: out of the collector's
        # sight, so a full collection no longer walks it (a ~0.27 s pause of every thread, measured with torch loaded)
        gc.freeze()
        self._loaded = True
        await self._update_health()
        log.info("SERVING %s", ", ".join(i.name for task in SERVICE_OF_TASK for i in self.registry.infos(task)))

    async def _load_models(self) -> None:
        """The models already built first (seconds each), then each missing one built and loaded, in config order (a
        compression job may build on the model before it); one at a time: memory. Each serves once loaded."""
        built = [m for m in self.config.models if is_built(m)]
        missing = [m for m in self.config.models if m not in built]
        for model in missing:
            self.registry.set_state(model.name, "waiting to be built")
        for model in built + missing:
            if self._stopping:
                return
            if model in missing:
                self.registry.set_state(model.name, f"building {model.build!r}" if model.build else "missing")
                await asyncio.to_thread(build_missing, model)
            self.registry.set_state(model.name, "loading")
            await self.registry.load(model, self.cache)
            await self._update_health()

    async def _start_http(self) -> None:
        """The OpenAI-compatible HTTP API on its own port: the same registry (and so cache), keys and health."""
        from prunefusion.server.openai.frontend import HttpFrontend
        from prunefusion.server.openai.routes import HttpContext, build_app

        cfg = self.config.server
        context = HttpContext(self.registry, self.access, ready=lambda: self._serving.get("") is True,
                              max_body_bytes=cfg.max_text_request_kb << 10, started=int(time.time()))
        host = cfg.http_host or cfg.host
        self.http = HttpFrontend(build_app(context), host, cfg.http_port, tls=cfg.tls,
                                 graceful_seconds=cfg.drain_seconds + FLUSH_SECONDS, access_log_on=cfg.access_log)
        await self.http.start()
        self.http_port = self.http.port
        log.info("OpenAI-compatible HTTP API on %s://%s:%d/v1", self.http.scheme, host, self.http_port)

    def _access_control(self) -> list[grpc.aio.ServerInterceptor]:
        """The interceptor (API keys, access log) when either is on; an unreadable keys file stops the start."""
        cfg = self.config.server
        keys = None
        if cfg.auth is not None:
            self._key_source = KeySource.of(cfg.auth.api_keys_file, cfg.auth.api_keys_env, cfg.auth.default_limits)
            self._key_signature = self._key_source.signature()
            try:
                keys = self._key_source.load()
            except ValueError as err:
                raise ConfigError(str(err)) from None
            log.info("API keys required (%d keys: %s)", len(keys.keys), ", ".join(k.name for k in keys.keys))
        if keys is None and not cfg.access_log:
            return []
        self.access = AccessControl(keys, model_of=self.registry.model_for, access_log_on=cfg.access_log,
                                    reflection_requires_key=cfg.auth is None or cfg.auth.reflection_requires_key)
        return [self.access]

    def _bind(self, server: grpc.aio.Server, host: str, port: int, plaintext: bool = False) -> int:
        tls = self.config.server.tls
        if tls is None or plaintext:
            bound = server.add_insecure_port(f"{host}:{port}")
        else:
            from prunefusion.server.auth.tls import server_credentials

            try:
                bound = server.add_secure_port(f"{host}:{port}", server_credentials(tls))
            except ValueError as err:
                raise ConfigError(str(err)) from None
        if bound == 0:
            raise OSError(f"could not bind {host}:{port}")
        return bound

    def _security(self) -> str:
        cfg = self.config.server
        tls = "plaintext" if cfg.tls is None else ("mutual TLS" if cfg.tls.client_ca_file else "TLS")
        return f"{tls}, {'API keys' if cfg.auth else 'no API keys'}"

    def reload_keys(self) -> bool:
        """Re-read the API keys (SIGHUP, or the file changed); a bad file keeps the keys in force. True if loaded."""
        if self._key_source is None:
            return False
        self._key_signature = self._key_source.signature()
        try:
            keys = self._key_source.load()
        except ValueError as err:
            log.error("API keys not reloaded, the previous ones stay in force: %s", err)
            return False
        self.access.replace_keys(keys)
        log.info("API keys reloaded (%d keys: %s)", len(keys.keys), ", ".join(k.name for k in keys.keys))
        return True

    async def _watch_keys(self, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            if self._key_source.signature() != self._key_signature:
                self.reload_keys()

    async def _watch_health(self, every_s: float = 1.0) -> None:
        """Follow the services' health: NOT_SERVING if an engine stops being healthy (e.g. its loop died), SERVING
        again if it recovers."""
        while True:
            await asyncio.sleep(every_s)
            await self._update_health()

    async def stop(self, grace: float | None = None, delay: float | None = None) -> None:
        """Drain: health NOT_SERVING; keep serving for `delay` (default server.drain_delay_seconds); refuse new
        calls and let in-flight ones finish within `grace` (default server.drain_seconds); then end the streams
        still running with a CANCELLED final chunk (the engines' shutdown) and stop."""
        if self._stopped.is_set() or self._stopping:
            return
        self._stopping = True
        if not self._started.is_set():  # a signal during start-up: let loading finish, then drain at once
            log.info("stop requested while starting; stopping once start-up has finished")
            await self._started.wait()
        for task in (self._health_watch, self._key_watch):
            if task is not None:
                task.cancel()
        grace = self.config.server.drain_seconds if grace is None else grace
        delay = self.config.server.drain_delay_seconds if delay is None else delay
        await self._set_health(False)  # watchers hear it now, while the port still answers
        if delay > 0 and self._server is not None:
            log.info("NOT_SERVING; still serving for %.1f s (drain_delay_seconds) before draining", delay)
            await asyncio.sleep(delay)
        log.info("draining (up to %.0f s for in-flight requests)", grace)
        self.health.end_watches()  # a watcher never finishes by itself: it would hold the drain to its end
        http_stopping = asyncio.ensure_future(self.http.stop()) if self.http is not None else None
        if self._server is not None:
            # the server stops accepting now; in-flight calls keep running. At the end of `grace` the engines end
            # their streams (a final CANCELLED chunk each) and the flush time lets those last messages go out
            # before gRPC cuts whatever is left
            stopping = asyncio.ensure_future(self._server.stop(grace + FLUSH_SECONDS))
            # both front ends' calls in flight (the HTTP one's stop returns once its requests have ended)
            draining = {stopping} | ({http_stopping} if http_stopping is not None else set())
            _, pending = await asyncio.wait(draining, timeout=grace)
            if pending:
                log.info("drain time is up: ending the requests still running (FINISH_REASON_CANCELLED)")
            await self.registry.shutdown()
            await stopping
        else:  # start-up failed before the port was bound
            await self.registry.shutdown()
        if http_stopping is not None:
            await http_stopping
        if self._health_server is not None:
            await self._health_server.stop(0)
        if self._quality is not None:
            self._quality.close()
        await self.cache.close()
        if self._metrics_http is not None:
            await asyncio.to_thread(self._metrics_http.shutdown)  # waits for its serve loop: not on the event loop
            self._metrics_http.server_close()
        self._stopped.set()
        log.info("stopped")

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


async def serve(config: AppConfig) -> None:
    """Run until SIGTERM/SIGINT, then drain and return (the process exits 0)."""
    server = PrunefusionServer(config)
    loop = asyncio.get_running_loop()
    draining: list[asyncio.Task] = []  # keeps the drain task referenced; a second signal does not start another

    def on_signal(delay: float | None) -> None:
        if not draining:
            draining.append(asyncio.ensure_future(server.stop(delay=delay)))

    loop.add_signal_handler(signal.SIGTERM, on_signal, None)  # an orchestrator: give the endpoints time to update
    loop.add_signal_handler(signal.SIGINT, on_signal, 0.0)  # Ctrl-C: a person waiting, nobody to tell
    loop.add_signal_handler(signal.SIGHUP, server.reload_keys)
    await server.start()
    await server.wait_stopped()
