"""How long a fresh `prunefusion serve` takes to answer: the timeline of per-service health and first answers.

    .venv/bin/python benchmarks/first_answer.py                       # the default config on an empty home
    .venv/bin/python benchmarks/first_answer.py --until text          # stop once every text model has answered
    .venv/bin/python benchmarks/first_answer.py --config my.yaml --home /tmp/h

Starts the server on a fresh $PRUNEFUSION_HOME (so every model is built), then every 0.5 s asks each service's
health and sends each text model one 4-token greedy Generate (cache bypassed, no retries). Prints when each service
turned SERVING and when each model first answered, in seconds from the start, and writes the same as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from prunefusion.loadtest.server_process import free_port
from prunefusion_client import Client, GenerateOptions

SERVICES = ("", "prunefusion.v1.TextGeneration", "prunefusion.v1.Multimodal")


def config_with_port(path: str | None, port: int, out: Path) -> tuple[Path, list[str]]:
    """The config (default: the embedded default) on `port`, metrics off; and its text models' names."""
    from prunefusion.server.config import load_config

    data = load_config(path).model_dump(mode="json", exclude_unset=True)
    data.setdefault("server", {}).update({"host": "127.0.0.1", "port": port, "metrics_port": None, "http_port": None})
    out.write_text(yaml.safe_dump(data))
    text = [m["name"] for m in data["models"] if m.get("engine", "torch") in ("torch", "vllm")]
    return out, text


def timeline(config: Path, text_models: list[str], home: Path, until: str, timeout_s: float) -> dict[str, float]:
    port = int(yaml.safe_load(config.read_text())["server"]["port"])
    target = f"127.0.0.1:{port}"
    env = {**os.environ, "PRUNEFUSION_HOME": str(home)}
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "prunefusion.cli", "serve", "--config", str(config)], env=env,
                            stdout=subprocess.DEVNULL, stderr=open(home / "serve.log", "w"))  # noqa: SIM115
    seen: dict[str, float] = {}
    options = GenerateOptions(max_new_tokens=4, cache_policy="bypass")
    try:
        with grpc.insecure_channel(target) as channel, Client(target, max_attempts=1, timeout=30) as client:
            health = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() - started < timeout_s:
                assert proc.poll() is None, f"the server exited ({proc.returncode}); see {home / 'serve.log'}"
                now = time.monotonic() - started
                for service in SERVICES:
                    key = f"health {service or '(overall)'} SERVING"
                    if key not in seen:
                        try:
                            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status
                            if status == health_pb2.HealthCheckResponse.SERVING:
                                seen[key] = now
                                print(f"{now:8.1f} s  {key}", flush=True)
                        except grpc.RpcError:
                            pass
                for model in text_models:
                    key = f"first answer from {model}"
                    if key not in seen:
                        try:
                            client.generate("The os module", model, options)
                            seen[key] = time.monotonic() - started
                            print(f"{seen[key]:8.1f} s  {key}", flush=True)
                        except grpc.RpcError:
                            pass
                done_text = all(f"first answer from {m}" in seen for m in text_models)
                if (until == "text" and done_text) or "health (overall) SERVING" in seen:
                    break
                time.sleep(0.5)
    finally:
        proc.terminate()
        proc.wait(120)
    return seen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="server config (default: the embedded default config)")
    parser.add_argument("--home", help="PRUNEFUSION_HOME to build into (default: a new empty folder)")
    parser.add_argument("--until", choices=["all", "text"], default="all",
                        help="stop when everything is SERVING (all) or every text model has answered (text)")
    parser.add_argument("--timeout", type=float, default=3600, help="give up after this many seconds")
    parser.add_argument("--out", default="benchmarks/results/first_answer.json")
    args = parser.parse_args()
    home = Path(args.home or tempfile.mkdtemp(prefix="pf-first-answer-"))
    home.mkdir(parents=True, exist_ok=True)
    config, text_models = config_with_port(args.config, free_port(), home / "serve.yaml")
    seen = timeline(config, text_models, home, args.until, args.timeout)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"home": str(home), "events_s": seen}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
