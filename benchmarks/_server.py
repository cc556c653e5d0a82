"""Start `prunefusion serve` in its own process for a benchmark, and wait until it reports SERVING."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path


def start_server(model_dir: Path, tmp: Path, cache_yaml: str, timeout_s: float = 120) -> tuple[subprocess.Popen, str]:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp / "bench.yaml"
    config.write_text(f"server: {{host: 127.0.0.1, port: {port}, log_level: WARNING, metrics_port: null}}\n"
                      f"cache: {cache_yaml}\n"
                      f"models:\n  - name: bench\n    path: {model_dir}\n    max_batch_size: 16\n")
    proc = subprocess.Popen([sys.executable, "-m", "prunefusion.cli", "serve", "--config", str(config)])
    target = f"127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return proc, target
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"server did not become SERVING within {timeout_s:.0f} s")
