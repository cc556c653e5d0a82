"""R4 cancel storm: many requests cancelled at random moments (before the first token, mid-stream, unary calls,
client deadlines shorter than the work), several at once, so that some are cancelled while queued and some while
decoding. Then the server's own gauges (prunefusion_num_requests_running / _waiting) must return to 0, in-book
requests (admitted minus finished, from the counters) too, and a burst of normal requests must all succeed.

    prunefusion reliability short --only R4
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import grpc

from prunefusion.reliability.base import Goal, ScenarioResult
from prunefusion.reliability.served import Served, gauge_total, served
from prunefusion_client.v1 import text_generation_pb2 as pb
from prunefusion_client.v1 import text_generation_pb2_grpc as pb_grpc


@dataclass(frozen=True)
class Knobs:
    cancels: int  # requests started and cancelled
    concurrency: int  # in flight at once (above max_batch_size: some wait in the queue when cancelled)
    max_delay_s: float  # a request is cancelled U(0, max_delay_s) after it starts (mid-stream: after a chunk)
    followup: int = 16  # normal requests after the storm: all must succeed
    settle_timeout_s: float = 30.0  # how long the gauges may take to return to 0
    max_seconds: float = 300.0  # the storm stops starting requests after this


PROFILES = {
    "short": Knobs(cancels=200, concurrency=24, max_delay_s=0.5, max_seconds=90.0),
    "long": Knobs(cancels=1000, concurrency=48, max_delay_s=1.0),
}
MODEL = {"max_batch_size": 8, "max_queue": 128}  # a small batch: cancels land in the queue as well as in decoding
GAUGES = ("prunefusion_num_requests_running", "prunefusion_num_requests_waiting")


def request(rng: random.Random, tokens: int = 64) -> pb.GenerateRequest:
    return pb.GenerateRequest(model="pico", prompt=rng.choice(["The os module", "def f(x):", "import json"]),
                              max_new_tokens=tokens, temperature=1.0, seed=rng.getrandbits(63),
                              cache_policy=pb.CACHE_POLICY_BYPASS)


async def _drain(call) -> str:
    while await call.read() is not grpc.aio.EOF:  # read(), not `async for`: mid_stream reads a chunk first
        pass
    return "completed"  # it ended before it was cancelled


async def early(stub, rng: random.Random, delay: float) -> str:
    """Cancelled within the first 50 ms: often before it is admitted."""
    call = stub.GenerateStream(request(rng), timeout=60)
    return await _cancel_after(call, _drain(call), delay * 0.1)


async def mid_stream(stub, rng: random.Random, delay: float) -> str:
    call = stub.GenerateStream(request(rng), timeout=60)

    async def first_then_rest() -> str:
        await call.read()
        await asyncio.sleep(delay)
        call.cancel()
        return await _drain(call)

    return await _outcome(first_then_rest())


async def unary(stub, rng: random.Random, delay: float) -> str:
    call = stub.Generate(request(rng), timeout=60)
    return await _cancel_after(call, call, delay)


async def deadline(stub, rng: random.Random, delay: float) -> str:
    """A client deadline shorter than the work: the server sees the deadline pass, not a cancel."""
    return await _outcome(_drain(stub.GenerateStream(request(rng), timeout=max(0.01, delay))))


async def _cancel_after(call, awaited, delay: float) -> str:
    async def cancel() -> None:
        await asyncio.sleep(delay)
        call.cancel()

    canceller = asyncio.create_task(cancel())
    try:
        return await _outcome(awaited)
    finally:
        canceller.cancel()


async def _outcome(awaited) -> str:
    try:
        result = await awaited
    except asyncio.CancelledError:
        return "CANCELLED"
    except grpc.aio.AioRpcError as err:
        return err.code().name
    return result if isinstance(result, str) else "completed"


MODES = {"early": early, "mid_stream": mid_stream, "unary": unary, "deadline": deadline}
EXPECTED = {"CANCELLED", "DEADLINE_EXCEEDED", "completed"}  # anything else is an error of the storm


async def storm(target: str, knobs: Knobs, deadline_at: float) -> tuple[Counter, int]:
    """(mode/outcome counts, requests started)."""
    counts: Counter[str] = Counter()
    rng = random.Random(4)
    plan = [(rng.choice(list(MODES)), rng.uniform(0, knobs.max_delay_s), random.Random(i))
            for i in range(knobs.cancels)]
    gate = asyncio.Semaphore(knobs.concurrency)
    started = 0
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.TextGenerationStub(channel)

        async def one(mode: str, delay: float, own: random.Random) -> None:
            try:
                counts[f"{mode} {await MODES[mode](stub, own, delay)}"] += 1
            finally:
                gate.release()

        tasks = []
        for mode, delay, own in plan:
            await gate.acquire()  # the next one starts when a place is free: the bound on calls in flight
            if time.monotonic() > deadline_at:
                gate.release()
                break
            tasks.append(asyncio.create_task(one(mode, delay, own)))
            started += 1
        await asyncio.gather(*tasks)
    return counts, started


async def followup(target: str, n: int) -> tuple[int, float, Counter]:
    """n normal unary requests at once: (successes, seconds, failures by status)."""
    rng = random.Random(7)
    failures: Counter[str] = Counter()
    start = time.monotonic()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.TextGenerationStub(channel)

        async def one() -> bool:
            try:
                reply = await stub.Generate(request(rng, tokens=16), timeout=60)
            except grpc.aio.AioRpcError as err:
                failures[err.code().name] += 1
                return False
            return reply.usage.completion_tokens > 0

        ok = sum(await asyncio.gather(*(one() for _ in range(n))))
    return ok, time.monotonic() - start, failures


def settle(server: Served, timeout_s: float) -> tuple[float, float | None, dict]:
    """Poll /metrics until the running + waiting gauges read 0: (their sum then, seconds to 0 or None, counters)."""
    start = time.monotonic()
    while True:
        samples = server.metrics()
        in_use = sum(gauge_total(samples, name) for name in GAUGES)
        if in_use == 0 or time.monotonic() - start > timeout_s:
            break
        time.sleep(0.25)
    waited = time.monotonic() - start
    counters = {"admitted": gauge_total(samples, "prunefusion_model_runs_total"),
                "finished": gauge_total(samples, "prunefusion_requests_finished_total"),
                "finished_cancelled": sum(v for (name, labels), v in samples.items()
                                          if name == "prunefusion_requests_finished_total"
                                          and ("reason", "cancelled") in labels)}
    return in_use, (waited if in_use == 0 else None), counters


async def watched_storm(server: Served, knobs: Knobs, deadline_at: float, trace: list) -> tuple[Counter, int]:
    """The storm, with the gauges sampled every 0.25 s beside it into `trace`: (seconds, running, waiting)."""
    t0 = time.monotonic()

    async def watch() -> None:
        while True:
            samples = await asyncio.to_thread(server.metrics)
            trace.append((time.monotonic() - t0, *(gauge_total(samples, name) for name in GAUGES)))
            await asyncio.sleep(0.25)

    watcher = asyncio.create_task(watch())
    try:
        return await storm(server.target, knobs, deadline_at)
    finally:
        watcher.cancel()


def run(profile: str, out: Path) -> ScenarioResult:
    knobs = PROFILES[profile]
    start = time.monotonic()
    trace: list[tuple[float, float, float]] = []
    with served(out, model=MODEL) as server:
        storm_start = time.monotonic()
        counts, sent = asyncio.run(watched_storm(server, knobs, start + knobs.max_seconds, trace))
        storm_seconds = time.monotonic() - storm_start
        leaked, settle_seconds, counters = settle(server, knobs.settle_timeout_s)
        ok, followup_seconds, failures = asyncio.run(followup(server.target, knobs.followup))
        health = server.health()
    by_outcome = Counter()
    for key, n in counts.items():
        by_outcome[key.split(" ", 1)[1]] += n
    unexpected = sum(n for outcome, n in by_outcome.items() if outcome not in EXPECTED)
    in_book = counters["admitted"] - counters["finished"]
    figures = {
        "requests_started": sent, "cancelled": by_outcome["CANCELLED"],
        "deadline_exceeded": by_outcome["DEADLINE_EXCEEDED"], "completed_before_cancel": by_outcome["completed"],
        "unexpected_statuses": {k: v for k, v in by_outcome.items() if k not in EXPECTED},
        "by_mode": dict(sorted(counts.items())), "storm_seconds": round(storm_seconds, 1),
        "leaked_slots": leaked, "settle_seconds": None if settle_seconds is None else round(settle_seconds, 2),
        **{f"counter_{k}": v for k, v in counters.items()}, "admitted_not_finished": in_book,
        "followup_ok": f"{ok}/{knobs.followup}", "followup_seconds": round(followup_seconds, 2),
        "followup_failures": dict(failures), "health_after": health,
    }
    goals = [
        Goal(f"{knobs.cancels} requests started and cancelled", sent, sent >= knobs.cancels),
        Goal("no status but CANCELLED / DEADLINE_EXCEEDED in the storm", unexpected, unexpected == 0),
        Goal("0 leaked slots (running + waiting gauges after settling)", leaked, leaked == 0),
        Goal("admitted = finished (no request left in the book)", in_book, in_book == 0),
        Goal(f"follow-up burst of {knobs.followup}: all succeed", f"{ok}/{knobs.followup}", ok == knobs.followup),
    ]
    notes = [] if health == "SERVING" else [f"health after the storm: {health}"]
    plot = _plot(out, trace, storm_seconds, settle_seconds)
    return ScenarioResult("R4", "cancel storm", figures, goals, [plot], [], time.monotonic() - start, notes)


def _plot(out: Path, trace: list[tuple[float, float, float]], storm_seconds: float,
          settle_seconds: float | None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.2))
    if trace:
        t, running, waiting = zip(*trace, strict=True)
        ax.step(t, running, where="post", label="running (gauge)")
        ax.step(t, waiting, where="post", label="waiting (gauge)")
    ax.axvline(storm_seconds, color="grey", linestyle="--")
    settled = "never" if settle_seconds is None else f"{settle_seconds:.2f} s later"
    ax.text(storm_seconds, ax.get_ylim()[1], f" storm ends; 0 {settled}", va="top", fontsize=8)
    ax.set(xlabel="seconds", ylabel="requests", title="cancel storm: the server's slots")
    ax.legend(loc="upper left")
    fig.tight_layout()
    path = out / "r4_cancel.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
