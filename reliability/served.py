"""A served pico deployment for the scenarios that only need a running server (R1, R2, R4): the pico LM (and, on
request, a pico Transfusion model), the server's Prometheus metrics read back, its health asked. Loopback only.

The pico models are built once beside the scenario's folder (`out.parent`), so the scenarios of one suite run share
them: building the LM's tokenizer is most of the 10 s a build takes on 2 cores.
"""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunefusion.loadtest.server_process import ServerProcess
from prunefusion.reliability import common

METRICS_LINE = re.compile(r"metrics on http://([^:/\s]+):(\d+)/metrics")
PICO_IMAGE_MODEL = "pico-tf"


def build_pico_transfusion(out_dir: Path, *, seed: int = 0) -> Path:
    """A servable random-weight Transfusion model (as tests/conftest.py's), built once per directory."""
    if (out_dir / "config.json").is_file():
        return out_dir
    import torch

    from prunefusion.transfusion import shapes
    from prunefusion.transfusion.build import save_model
    from prunefusion.transfusion.model import Transfusion, TransfusionConfig
    from prunefusion.transfusion.tokenizer import WordTokenizer

    torch.manual_seed(seed)
    tok = WordTokenizer(shapes.caption_words())
    model = Transfusion(TransfusionConfig(vocab_size=len(tok), d_model=32, n_layers=2, n_heads=2, patch_size=8))
    save_model(model.eval(), tok, out_dir)
    return out_dir


@dataclass
class Served:
    server: ServerProcess
    metrics_url: str | None  # http://127.0.0.1:PORT/metrics, from the server's log line

    @property
    def target(self) -> str:
        return self.server.target

    @property
    def pid(self) -> int:
        return self.server.proc.pid

    def alive(self) -> bool:
        return self.server.proc.poll() is None

    def metrics(self, timeout_s: float = 5.0) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of /metrics now: (name, sorted labels) -> value."""
        from prometheus_client.parser import text_string_to_metric_families

        if self.metrics_url is None:
            raise RuntimeError("the server logged no metrics port")
        with urllib.request.urlopen(self.metrics_url, timeout=timeout_s) as reply:  # noqa: S310 - loopback
            text = reply.read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def health(self, service: str = "", timeout_s: float = 5.0) -> str:
        """The health status name ("SERVING", ...), or the gRPC status code's name when the check itself fails."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(self.target) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                                  timeout=timeout_s)
            except grpc.RpcError as err:
                return err.code().name
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def rss(self) -> int:
        return common.rss_bytes(self.pid)

    def fds(self) -> int:
        return common.open_fds(self.pid)


def _metrics_url(log: Path, timeout_s: float = 5.0) -> str | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = METRICS_LINE.findall(log.read_text(errors="replace")) if log.is_file() else []
        if found:  # the last: ServerProcess appends to a log
            return f"http://{found[-1][0]}:{found[-1][1]}/metrics"
        time.sleep(0.1)
    return None


@contextmanager
def served(out: Path, *, images: dict[str, Any] | None = None, model: dict[str, Any] | None = None,
           server: dict[str, Any] | None = None, quality: dict[str, Any] | None = None) -> Iterator[Served]:
    """The pico LM served as `pico` (plus `pico-tf` when `images` is given: the Transfusion model's `images:`
    options), its config and log under `out`; stopped (SIGTERM, drained) on exit, also on error."""
    out.mkdir(parents=True, exist_ok=True)
    lm = common.build_pico_lm(out.parent / "pico-lm")
    config = common.write_config(out / "config.yaml", lm, server=server, model=model, quality=quality)
    if images is not None:
        import yaml

        tf = build_pico_transfusion(out.parent / "pico-transfusion")
        data = yaml.safe_load(config.read_text())
        data["models"].append({"name": PICO_IMAGE_MODEL, "path": str(tf), "engine": "transfusion",
                               "images": images})
        config.write_text(yaml.safe_dump(data))
    log = out / "server.log"
    log.unlink(missing_ok=True)  # ServerProcess appends: this run's lines only
    process = common.serve(config, log)
    try:
        yield Served(process, _metrics_url(log))
    finally:
        process.stop()


def gauge_total(samples: dict, name: str) -> float:
    """A metric summed over its label sets (e.g. every model's prunefusion_num_requests_running)."""
    return sum(value for (sample, _), value in samples.items() if sample == name)
