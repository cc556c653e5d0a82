"""Start `prunefusion serve` in its own process for a benchmark (loadtest's ServerProcess), and time things."""

from __future__ import annotations

import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from prunefusion.loadtest.server_process import ServerProcess


def start_server(model_dir: Path, tmp: Path, cache_yaml: str, timeout_s: float = 120,
                 server_yaml: str = "") -> tuple[subprocess.Popen, str]:
    """One LM named `bench` (max batch 16) with the given cache config (and more `server:` keys, e.g.
    "auth: {...}"); returns (process, target)."""
    config = tmp / "bench.yaml"
    extra = f", {server_yaml}" if server_yaml else ""
    config.write_text(f"server: {{host: 127.0.0.1, port: 0, log_level: WARNING, metrics_port: null, "
                      f"http_port: null{extra}}}\n"
                      f"cache: {cache_yaml}\n"
                      f"models:\n  - name: bench\n    path: {model_dir}\n    max_batch_size: 16\n")
    server = ServerProcess(config, startup_timeout_s=timeout_s, log=tmp / "server.log")  # read it when a start fails
    return server.proc, server.target


def median_seconds(fn: Callable[[], object], repeats: int, warmup: Callable[[], object] | None = None) -> float:
    """Median wall time of `repeats` calls of fn, after one warm-up call (of `warmup`, default fn)."""
    (warmup or fn)()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)
