"""Three `prunefusion serve` replicas behind one real redis-server, reached by one client balancing over them.

What deploy/README.md promises for Kubernetes (a Deployment's pods behind a headless Service, the Redis URL from a
Secret), checked with real processes on loopback: a result computed on one replica is a hit on another; identical
concurrent requests spread over the replicas run the model once; a replica killed under load costs no request.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from conftest import RedisProcess, free_port
from pico import build_pico_llama
from prometheus_client.parser import text_string_to_metric_families
from test_process import wait_serving

from prunefusion_client import AsyncClient, Client, GenerateOptions
from prunefusion_client.v1 import text_generation_pb2 as pb

REPLICAS = 3


def metric(metrics_port: int, name: str) -> float:
    """The sum of a counter's samples on one replica."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


class Replicas:
    def __init__(self, tmp_path, redis: RedisProcess):
        self.model_dir = build_pico_llama(tmp_path / "sf", context=1024, layers=8, hidden=256)  # ~1 s per request
        # the URL as a Kubernetes Secret would give it: an environment variable the config names
        env = {**os.environ, "PRUNEFUSION_REDIS_URL": redis.url}
        self.procs, self.ports, self.metrics_ports = [], [], []
        for i in range(REPLICAS):
            port, metrics_port = free_port(), free_port()
            config = tmp_path / f"replica{i}.yaml"
            config.write_text(f"server: {{host: 127.0.0.1, port: {port}, metrics_port: {metrics_port}, "
                              "http_port: null, "
                              "drain_delay_seconds: 0}\n"
                              "cache: {url: '${PRUNEFUSION_REDIS_URL}', timeout_ms: 5000}\n"
                              f"models:\n  - name: sf\n    path: {self.model_dir}\n    max_new_tokens_limit: 400\n")
            self.procs.append(subprocess.Popen([sys.executable, "-m", "prunefusion.cli", "serve", "--config",
                                                str(config)], stderr=subprocess.PIPE, text=True, env=env))
            self.ports.append(port)
            self.metrics_ports.append(metrics_port)

    @property
    def targets(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.ports]

    def runs(self) -> list[float]:
        return [metric(p, "prunefusion_model_runs_total") for p in self.metrics_ports]

    def lookups(self) -> list[float]:
        return [metric(p, "prunefusion_cache_lookups_total") for p in self.metrics_ports]

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            proc.wait(60)


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    redis = RedisProcess().start()
    group = Replicas(tmp_path_factory.mktemp("replicas"), redis)
    try:
        for proc, target in zip(group.procs, group.targets, strict=True):
            wait_serving(target, proc)
        yield group
    finally:
        group.stop()
        redis.kill()


@pytest.mark.slow
def test_a_result_computed_on_one_replica_is_a_hit_on_another(replicas):
    options = GenerateOptions(max_new_tokens=8)
    before = replicas.runs()
    with Client(replicas.targets[0], max_attempts=1) as a, Client(replicas.targets[1], max_attempts=1) as b:
        first = a.generate("A result made on A", "sf", options)
        second = b.generate("A result made on A", "sf", options)
    runs = [after - b for after, b in zip(replicas.runs(), before, strict=True)]
    assert not first.cached and second.cached and second.cache_source == pb.CACHE_SOURCE_STORED
    assert (second.text, list(second.token_ids)) == (first.text, list(first.token_ids))
    assert runs == [1, 0, 0]


@pytest.mark.slow
def test_sixteen_identical_requests_over_the_replicas_run_the_model_once(replicas):
    before_runs, before_lookups = replicas.runs(), replicas.lookups()

    async def burst():
        async with AsyncClient(",".join(replicas.targets), max_attempts=1) as client:
            for _ in range(2 * REPLICAS):  # connect to every replica first: round_robin uses the ready ones
                await client.list_models()
            await asyncio.sleep(0.5)
            opts = GenerateOptions(max_new_tokens=300)
            return await asyncio.gather(*(client.generate("Sixteen at once", "sf", opts) for _ in range(16)))

    responses = asyncio.run(burst())
    runs = [a - b for a, b in zip(replicas.runs(), before_runs, strict=True)]
    lookups = [a - b for a, b in zip(replicas.lookups(), before_lookups, strict=True)]
    assert sum(runs) == 1, runs
    assert all(n > 0 for n in lookups), f"the balanced client left a replica out: {lookups}"
    assert len({(r.text, tuple(r.token_ids)) for r in responses}) == 1
    assert sum(not r.cached for r in responses) == 1


@pytest.mark.slow
def test_a_replica_killed_under_load_fails_no_request(replicas):
    """Four callers loop on uncached requests (the model runs each time) through one balanced client with its
    default retries; one replica is SIGKILLed while it is running some of them. Those calls fail UNAVAILABLE and are
    retried on the others: no caller sees an error. (Runs last: it kills a replica of the module's group.)"""
    outcomes: list[str] = []
    killed, done = threading.Event(), threading.Event()

    def caller(i: int) -> None:
        options = GenerateOptions(max_new_tokens=48, cache_policy="bypass")
        with Client(",".join(replicas.targets), timeout=60) as client:
            while not done.is_set():
                try:
                    client.generate(f"caller {i}", "sf", options)
                    outcomes.append("after" if killed.is_set() else "before")
                except Exception as err:  # noqa: BLE001 - every failure is the finding
                    outcomes.append(f"failed: {err!r}")

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    victim, victim_metrics = replicas.procs[2], replicas.metrics_ports[2]
    deadline = time.monotonic() + 60
    while outcomes.count("before") < 8 or metric(victim_metrics, "prunefusion_num_requests_running") < 1:
        assert time.monotonic() < deadline, f"the load never reached the victim: {outcomes}"
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)  # with a request of ours running on it
    killed.set()
    time.sleep(5.0)
    done.set()
    for t in threads:
        t.join(90)
    failed = [o for o in outcomes if o.startswith("failed")]
    assert victim.wait(10) == -signal.SIGKILL
    assert not failed, failed[:3]
    assert outcomes.count("after") >= 4, outcomes
