"""R2 soak: N GenerateStream streams at once for a while, each starting its next request when one ends (seeded
sampling, cache bypassed: the model runs every time), each on its own connection. Every second the server's RSS and
open file descriptors are sampled and every stream's silence measured: a stream with no chunk for more than 5 s is
stuck. After the load the connections close and the server's descriptors must return to their baseline.

    prunefusion reliability short --only R2
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import grpc

from prunefusion.reliability.base import Goal, ScenarioResult
from prunefusion.reliability.served import Served, served
from prunefusion_client.v1 import text_generation_pb2 as pb
from prunefusion_client.v1 import text_generation_pb2_grpc as pb_grpc


@dataclass(frozen=True)
class Knobs:
    streams: int  # concurrent streams, each on its own connection
    seconds: float  # how long the load runs
    warmup_s: float  # the RSS baseline is the first sample after this
    max_new_tokens: int = 24
    stuck_s: float = 5.0  # no chunk for longer: the stream is stuck
    fd_slack: int = 4  # descriptors above the baseline still counted as back to it
    settle_s: float = 15.0  # how long the descriptors may take to return after the load
    call_timeout_s: float = 60.0  # per request: a bound, never expected to be reached


PROFILES = {
    "short": Knobs(streams=16, seconds=15.0, warmup_s=4.0),
    "long": Knobs(streams=64, seconds=120.0, warmup_s=20.0),
}
RSS_GROWTH_LIMIT = 10.0  # percent
PROMPTS = ["The os module", "def main():", "import sys\n", "A list comprehension", "class Config:", "The json"]


class Streams:
    """The streams' shared record: per-stream time of the last chunk (None between requests), counts, errors."""

    def __init__(self, n: int) -> None:
        self.last: list[float | None] = [None] * n
        self.started: list[bool] = [False] * n  # the current request has sent a chunk
        self.call: list[int] = [0] * n
        self.stuck: dict[tuple[int, int], str] = {}  # (stream, its request number) -> "first chunk" | "mid-stream"
        self.longest = {"first chunk": 0.0, "mid-stream": 0.0}  # the longest silence of each kind
        self.completed = 0
        self.chunks = 0
        self.errors: Counter[str] = Counter()
        self.lock = threading.Lock()

    def watch(self, now: float, stuck_s: float) -> int:
        """Note every stream silent for more than stuck_s; how many are in a request now."""
        active = 0
        for i, last in enumerate(self.last):
            if last is None:
                continue
            active += 1
            phase = "mid-stream" if self.started[i] else "first chunk"
            self.longest[phase] = max(self.longest[phase], now - last)
            if now - last > stuck_s:
                self.stuck.setdefault((i, self.call[i]), phase)
        return active


def stream_loop(i: int, target: str, knobs: Knobs, streams: Streams, stop: threading.Event) -> None:
    rng = random.Random(i)
    # its own subchannel pool: its own TCP connection (channels to one target otherwise share one)
    with grpc.insecure_channel(target, [("grpc.use_local_subchannel_pool", 1)]) as channel:
        stub = pb_grpc.TextGenerationStub(channel)
        while not stop.is_set():
            request = pb.GenerateRequest(model="pico", prompt=rng.choice(PROMPTS), max_new_tokens=knobs.max_new_tokens,
                                         temperature=1.0, seed=rng.getrandbits(63),
                                         cache_policy=pb.CACHE_POLICY_BYPASS)
            streams.call[i] += 1
            streams.started[i], streams.last[i] = False, time.monotonic()
            try:
                for _ in stub.GenerateStream(request, timeout=knobs.call_timeout_s):
                    streams.started[i], streams.last[i] = True, time.monotonic()
                    with streams.lock:
                        streams.chunks += 1
                with streams.lock:
                    streams.completed += 1
            except grpc.RpcError as err:
                with streams.lock:
                    streams.errors[err.code().name] += 1
            finally:
                streams.last[i] = None


def sample(server: Served, t0: float, active: int, completed: int) -> dict:
    return {"t": round(time.monotonic() - t0, 2), "rss": server.rss(), "fds": server.fds(), "active": active,
            "completed": completed}


def run(profile: str, out: Path) -> ScenarioResult:
    knobs = PROFILES[profile]
    started = time.monotonic()
    # every stream decodes at once: a stream waiting for a slot would read as stuck
    with served(out, model={"max_batch_size": knobs.streams, "max_queue": knobs.streams}) as server:
        with grpc.insecure_channel(server.target) as channel:  # one request first: the model's first step is slow
            pb_grpc.TextGenerationStub(channel).Generate(pb.GenerateRequest(model="pico", prompt="warm up"),
                                                         timeout=60)
        time.sleep(0.5)
        fds_base, rss_start = server.fds(), server.rss()
        streams, stop = Streams(knobs.streams), threading.Event()
        threads = [threading.Thread(target=stream_loop, args=(i, server.target, knobs, streams, stop), daemon=True,
                                    name=f"r2-stream-{i}") for i in range(knobs.streams)]
        t0 = time.monotonic()
        samples = [sample(server, t0, 0, 0)]
        for thread in threads:
            thread.start()
        while time.monotonic() - t0 < knobs.seconds:
            time.sleep(1.0)
            active = streams.watch(time.monotonic(), knobs.stuck_s)
            samples.append(sample(server, t0, active, streams.completed))
        stop.set()  # each stream ends its current request, then its channel closes
        joined = time.monotonic() + knobs.call_timeout_s
        while any(t.is_alive() for t in threads) and time.monotonic() < joined:
            time.sleep(1.0)
            active = streams.watch(time.monotonic(), knobs.stuck_s)
            samples.append(sample(server, t0, active, streams.completed))
        unfinished = sum(t.is_alive() for t in threads)
        load_end = time.monotonic() - t0
        fds_settled, settle = _settle_fds(server, fds_base + knobs.fd_slack, knobs.settle_s)
        samples.append(sample(server, t0, 0, streams.completed))
        alive = server.alive()
    return _result(knobs, out, streams, samples, fds_base, fds_settled, settle, rss_start, load_end, unfinished,
                   alive, time.monotonic() - started)


def _settle_fds(server: Served, limit: int, timeout_s: float) -> tuple[int, float]:
    """Wait until the server's descriptors are at most `limit`: (its count then, seconds waited)."""
    start = time.monotonic()
    fds = server.fds()
    while fds > limit and time.monotonic() - start < timeout_s:
        time.sleep(0.25)
        fds = server.fds()
    return fds, time.monotonic() - start


def _result(knobs: Knobs, out: Path, streams: Streams, samples: list[dict], fds_base: int, fds_end: int,
            settle: float, rss_start: int, load_end: float, unfinished: int, alive: bool,
            seconds: float) -> ScenarioResult:
    mib = 1 << 20
    during = [s for s in samples if s["t"] <= load_end]
    warm = next((s["rss"] for s in during if s["t"] >= knobs.warmup_s), during[0]["rss"] if during else rss_start)
    end = during[-1]["rss"] if during else rss_start
    growth = 100.0 * (end - warm) / warm
    errors = sum(streams.errors.values())
    figures = {
        "streams": knobs.streams, "load_seconds": round(load_end, 1), "requests_completed": streams.completed,
        "chunks": streams.chunks, "requests_per_second": round(streams.completed / max(load_end, 1e-9), 2),
        "errors": dict(streams.errors), "stuck_streams": len(streams.stuck),
        "stuck_by_phase": dict(Counter(streams.stuck.values())),
        "longest_wait_for_first_chunk_seconds": round(streams.longest["first chunk"], 2),
        "longest_gap_between_chunks_seconds": round(streams.longest["mid-stream"], 2),
        "unfinished_threads": unfinished,
        "rss_start_mib": round(rss_start / mib, 1), "rss_warm_mib": round(warm / mib, 1),
        "rss_end_mib": round(end / mib, 1), "rss_max_mib": round(max(s["rss"] for s in samples) / mib, 1),
        "rss_growth_percent": round(growth, 1), "fds_start": fds_base,
        "fds_max": max(s["fds"] for s in samples), "fds_end": fds_end, "fds_settle_seconds": round(settle, 1),
    }
    goals = [
        Goal("0 errors", errors, errors == 0 and alive),
        Goal(f"0 stuck streams (no chunk for > {knobs.stuck_s:.0f} s)", len(streams.stuck), not streams.stuck),
        Goal(f"RSS growth after warm-up < {RSS_GROWTH_LIMIT:.0f}%", figures["rss_growth_percent"],
             growth < RSS_GROWTH_LIMIT),
        Goal(f"open FDs back to baseline ({fds_base}) +{knobs.fd_slack} after the load", fds_end,
             fds_end <= fds_base + knobs.fd_slack),
        Goal("every stream completed requests", streams.completed, streams.completed >= knobs.streams),
    ]
    notes = [] if alive else ["the server exited during the soak"]
    return ScenarioResult("R2", "soak", figures, goals, [_plot(out, samples, knobs, load_end)], [], seconds, notes)


def _plot(out: Path, samples: list[dict], knobs: Knobs, load_end: float) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t"] for s in samples]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.plot(t, [s["rss"] / (1 << 20) for s in samples], color="tab:blue", label="RSS")
    ax.set(xlabel="seconds", ylabel="server RSS (MiB)", title=f"soak: {knobs.streams} streams")
    fds = ax.twinx()
    fds.plot(t, [s["fds"] for s in samples], color="tab:orange", label="open FDs")
    fds.set_ylabel("open FDs")
    top = ax.get_ylim()[1]
    for x, label, va in ((knobs.warmup_s, "warm", "top"), (knobs.seconds, "stop", "top"),
                         (load_end, "drained", "bottom")):
        ax.axvline(x, color="grey", linestyle="--")
        ax.text(x, top, f" {label}", va=va, fontsize=8)
    ax.legend(ax.get_lines()[:1] + fds.get_lines(), ["RSS", "open FDs"], loc="lower center")
    fig.tight_layout()
    path = out / "r2_soak.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
