"""The console scripts as a user runs them: `prunefusion serve` (SIGTERM), `prunefusion-client`, `models build`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
from conftest import free_port
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pico import build_pico_llama

from prunefusion_client import Client, GenerateOptions
from prunefusion_client.v1 import text_generation_pb2 as pb

PYTHON = sys.executable


def wait_serving(target: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < end:
            assert proc.poll() is None, proc.stderr.read()
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError("server did not become SERVING")


def serve_slow_model(tmp_path, server: str, *, context: int, max_new_tokens: int,
                     extra: str = "") -> tuple[subprocess.Popen, str]:
    """`prunefusion serve` of a pico model wide enough that a long generation is still running when SIGTERM lands;
    `server` holds the server section's keys beyond host and port. (process, target), once SERVING."""
    model_dir = build_pico_llama(tmp_path / "slow", context=context, layers=8, hidden=256)
    port = free_port()
    config = tmp_path / "server.yaml"
    config.write_text(f"server: {{host: 127.0.0.1, port: {port}, {server}}}\n{extra}"
                      f"models:\n  - name: slow\n    path: {model_dir}\n    max_new_tokens_limit: {max_new_tokens}\n")
    proc = subprocess.Popen([PYTHON, "-m", "prunefusion.cli", "serve", "--config", str(config)],
                            stderr=subprocess.PIPE, text=True)
    target = f"127.0.0.1:{port}"
    try:
        wait_serving(target, proc)
    except BaseException:
        proc.kill()
        raise
    return proc, target


@pytest.mark.slow
def test_sigterm_drains_in_flight_requests_and_exits_zero(tmp_path):
    # log_requests: the request's own log line shows it finished after the drain began
    proc, target = serve_slow_model(tmp_path, "drain_seconds: 60, metrics_port: 0, http_port: null, log_requests: true",
                                    context=1024, max_new_tokens=1000)
    try:
        statuses: list[int] = []
        watch_channel = grpc.insecure_channel(target)
        watch = health_pb2_grpc.HealthStub(watch_channel).Watch(health_pb2.HealthCheckRequest())

        def follow():
            try:
                for update in watch:
                    statuses.append(update.status)
                    if update.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                        watch.cancel()
            except grpc.RpcError as err:  # our own cancel, or the server closing the stream when it stops
                assert err.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)

        watcher = threading.Thread(target=follow, daemon=True)
        watcher.start()
        deadline = time.monotonic() + 30
        while not statuses:  # the watch must be established before the drain refuses new calls
            assert time.monotonic() < deadline, "health Watch sent nothing"
            time.sleep(0.01)
        with Client(target, max_attempts=1) as client:
            stream = client.generate_stream("The os module", "slow",
                                            GenerateOptions(max_new_tokens=900, request_id="in-flight"))
            chunks = [next(stream)]
            proc.send_signal(signal.SIGTERM)
            chunks += list(stream)
        watcher.join(10)
        watch_channel.close()
        assert proc.wait(60) == 0
        log = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert chunks[-1].finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_EOS)
    assert sum(len(c.token_ids) for c in chunks) == chunks[-1].usage.completion_tokens
    assert statuses[0] == health_pb2.HealthCheckResponse.SERVING
    assert statuses[-1] == health_pb2.HealthCheckResponse.NOT_SERVING
    # the request was still running when draining began, and finished normally afterwards
    assert log.index("draining") < log.index("request in-flight")
    assert "finish=length" in log or "finish=eos" in log


@pytest.mark.slow
def test_sigterm_drains_the_http_api_too(tmp_path):
    """SIGTERM with an HTTP stream in flight: /ready says 503 at once while new HTTP requests are still answered
    through the drain delay; the stream runs to its end (`finish_reason: length`, then `[DONE]`); exit 0."""
    import httpx

    http_port = free_port()
    proc, target = serve_slow_model(tmp_path, f"drain_delay_seconds: 1.5, drain_seconds: 60, metrics_port: null, "
                                    f"http_port: {http_port}", context=1024, max_new_tokens=600,
                                    extra="quality: {enabled: false}\n")
    base = f"http://127.0.0.1:{http_port}"
    try:
        assert httpx.get(f"{base}/ready", timeout=10).status_code == 200
        body = {"model": "slow", "prompt": "The os module", "max_tokens": 600, "temperature": 0, "stream": True,
                "ignore_eos": True}
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as reply:
            lines = reply.iter_lines()
            events = [next(line for line in lines if line.startswith("data: "))]
            proc.send_signal(signal.SIGTERM)
            while httpx.get(f"{base}/ready", timeout=10).status_code != 503:
                time.sleep(0.01)
            during_delay = httpx.post(f"{base}/v1/completions", json={**body, "stream": False, "max_tokens": 3},
                                      timeout=30)
            events += [line for line in lines if line.startswith("data: ")]
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert during_delay.status_code == 200 and during_delay.json()["usage"]["completion_tokens"] == 3
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert len(chunks) > 100  # every token's chunk arrived, through the drain


@pytest.mark.slow
def test_sigterm_keeps_serving_through_the_drain_delay_then_ends_streams_cancelled(tmp_path):
    """Health says NOT_SERVING at once while new calls are still answered for drain_delay_seconds; a stream still
    running when drain_seconds end gets a final FINISH_REASON_CANCELLED chunk (not a cut stream); exit 0."""
    proc, target = serve_slow_model(tmp_path, "drain_delay_seconds: 1.5, drain_seconds: 1, metrics_port: null, "
                                    "http_port: null",
                                    context=2048, max_new_tokens=1900, extra="quality: {enabled: false}\n")
    try:
        with Client(target, max_attempts=1) as client, grpc.insecure_channel(target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            stream = client.generate_stream("The os module", "slow",
                                            GenerateOptions(max_new_tokens=1900, cache_policy="bypass"))
            chunks = [next(stream)]
            proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            while health.Check(health_pb2.HealthCheckRequest(), timeout=5).status != \
                    health_pb2.HealthCheckResponse.NOT_SERVING:
                time.sleep(0.01)
            during_delay = client.generate("A new request", "slow", GenerateOptions(max_new_tokens=4))
            answered_after = time.monotonic() - signalled
            chunks += list(stream)
        assert proc.wait(30) == 0
        log = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert during_delay.usage.completion_tokens == 4 and answered_after < 1.5
    final = chunks[-1]
    assert final.finish_reason == pb.FINISH_REASON_CANCELLED, log[-2000:]
    assert 0 < final.usage.completion_tokens < 1900
    assert sum(len(c.token_ids) for c in chunks) == final.usage.completion_tokens
    assert log.index("still serving for 1.5 s") < log.index("draining") < log.index("drain time is up")


def run_client(server, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "prunefusion_client.cli", "--target", server.target, *args],
                          capture_output=True, text=True, timeout=60)


def test_client_cli_generate_and_models(server, client):
    expected = client.generate("The os module", "pico", GenerateOptions(max_new_tokens=12)).text
    out = run_client(server, "generate", "The os module", "--model", "pico", "--max-new-tokens", "12")
    assert out.returncode == 0, out.stderr
    assert out.stdout == expected + "\n"
    assert "finish=" in out.stderr
    streamed = run_client(server, "generate", "The os module", "--model", "pico", "--max-new-tokens", "12",
                          "--stream")
    assert streamed.stdout == expected + "\n"
    listing = run_client(server, "--json", "models")
    assert [m["name"] for m in json.loads(listing.stdout)] == ["pico", "pico-one"]
    bad = run_client(server, "generate", "hi", "--model", "nope")
    assert bad.returncode == 1
    assert "NOT_FOUND" in bad.stderr


@pytest.mark.slow
def test_models_build_is_reproducible_and_complete(tmp_path):
    from transformers import AutoModelForCausalLM

    env = {**os.environ, "PRUNEFUSION_HOME": str(tmp_path / "home")}
    digests = []
    for name in ("a", "b"):
        out = tmp_path / name
        done = subprocess.run([PYTHON, "-m", "prunefusion.cli", "models", "build", "--recipe", "pico", "--out",
                               str(out)], capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr
        assert "held-out perplexity" in done.stdout
        manifest = json.loads((out / "manifest.json").read_text())
        digests.append(manifest["weights_digest"])
    assert digests[0] == digests[1]
    assert (out / "loss_curve.png").stat().st_size > 10_000
    assert manifest["corpus"]["held_out_documents"] > 0 and manifest["metrics"]["held_out_perplexity"] > 1
    assert not (tmp_path / "b.partial").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == manifest["recipe"]["num_layers"]
    again = subprocess.run([PYTHON, "-m", "prunefusion.cli", "models", "build", "--recipe", "pico", "--out",
                            str(out)], capture_output=True, text=True, env=env, timeout=60)
    assert again.returncode == 2 and "exists" in again.stderr  # bad input: one line, exit 2, as every command


@pytest.mark.slow
def test_serve_builds_missing_models_then_serves_them(tmp_path, monkeypatch):
    """A recipe, and a compression job over it (which removes 2 of its 4 layers), served side by side."""
    from conftest import ServerThread

    from prunefusion.server.config import parse_config

    monkeypatch.setenv("PRUNEFUSION_HOME", str(tmp_path / "home"))
    job = tmp_path / "pico-pruned.yaml"
    job.write_text("name: pico-pruned\nmodel: ${PRUNEFUSION_HOME}/models/fresh\nbuild: pico\n"
                   "calibration: {samples: 16, seq_len: 64}\nprune: {n: 2}\n"
                   "heal: {steps: 4, batch_size: 2, seq_len: 64, warmup_steps: 1}\n")
    config = parse_config({"server": {"host": "127.0.0.1", "port": 0, "metrics_port": 0, "http_port": None},
                           "models": [{"name": "fresh", "path": "${PRUNEFUSION_HOME}/models/fresh", "build": "pico"},
                                      {"name": "pruned", "path": "${PRUNEFUSION_HOME}/models/pruned",
                                       "build": str(job)}]})
    server = ServerThread(config).start()
    try:
        assert (tmp_path / "home" / "models" / "fresh" / "manifest.json").is_file()
        manifest = json.loads((tmp_path / "home" / "models" / "pruned" / "manifest.json").read_text())
        assert manifest["kind"] == "prunefusion.compressed" and len(manifest["kept"]) == 2
        with Client(server.target, max_attempts=1) as client:
            for name in ("fresh", "pruned"):
                options = GenerateOptions(max_new_tokens=4)
                assert client.generate("The os module", name, options).usage.completion_tokens
            layers = {info.name: info.num_layers for info in client.list_models()}
            assert layers == {"fresh": 4, "pruned": 2}
    finally:
        server.stop()


def model_runs(metrics_port: int, model: str) -> float:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "prunefusion_model_runs_total" and sample.labels.get("model") == model:
                return sample.value
    return 0.0


@pytest.mark.slow
def test_two_server_processes_sharing_redis_run_identical_requests_once(tmp_path, redis_server):
    import asyncio

    from prunefusion_client import AsyncClient

    model_dir = build_pico_llama(tmp_path / "sf", context=1024, layers=8, hidden=256)  # ~1 s per request
    # a generous Redis timeout: this checks coordination; failing open on a slow Redis (50 ms default) is tested
    # elsewhere, and a loaded 2-core CI machine can exceed 50 ms
    procs, targets, metrics_ports = [], [], []
    for i in range(2):
        port, metrics_port = free_port(), free_port()
        config = tmp_path / f"server{i}.yaml"
        config.write_text(f"server: {{host: 127.0.0.1, port: {port}, metrics_port: {metrics_port}, http_port: null}}\n"
                          f"cache: {{url: '{redis_server.url}', timeout_ms: 5000}}\n"
                          f"models:\n  - name: sf\n    path: {model_dir}\n    max_new_tokens_limit: 400\n")
        procs.append(subprocess.Popen([PYTHON, "-m", "prunefusion.cli", "serve", "--config", str(config)],
                                      stderr=subprocess.PIPE, text=True))
        targets.append(f"127.0.0.1:{port}")
        metrics_ports.append(metrics_port)
    try:
        for proc, target in zip(procs, targets, strict=True):
            wait_serving(target, proc)

        async def burst():
            clients = [AsyncClient(t, max_attempts=1) for t in targets]
            opts = GenerateOptions(max_new_tokens=300)
            try:
                return await asyncio.gather(*(clients[i % 2].generate("The os module", "sf", opts)
                                              for i in range(50)))
            finally:
                for c in clients:
                    await c.close()

        responses = asyncio.run(burst())
        runs = [model_runs(p, "sf") for p in metrics_ports]
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(60)
    assert sum(runs) == 1, runs
    assert len({(r.text, tuple(r.token_ids)) for r in responses}) == 1
    assert sum(not r.cached for r in responses) == 1
