"""R1 hostile input: thousands of requests no client should send (reliability/hostile_cases.py: hypothesis over every
RPC's fields, raw and malformed protobuf, gzip-compressed requests and bombs) against a served pico LM + pico
Transfusion + the quality filter, a few at a time. Every answer's status is counted; INTERNAL, UNKNOWN and hangs (no
answer within the call's timeout) are saved as reproducers; between batches the server must be SERVING, and its
memory after the run may exceed its memory after the warm-up by less than 10%.

    prunefusion reliability short --only R1
    python -m prunefusion.reliability.r1_hostile replay R1/reproducers/00012-Generate-INTERNAL.json 127.0.0.1:50051
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc

from prunefusion.reliability import hostile_cases as hc
from prunefusion.reliability.base import Goal, ScenarioResult
from prunefusion.reliability.served import Served, served


@dataclass(frozen=True)
class Knobs:
    cases: int  # hostile requests drawn and sent
    batch: int  # requests between two health checks (and RSS samples)
    workers: int  # calls in flight at once
    timeout_s: float  # per call: no answer by then is a hang
    embeddings: bool  # draw semdedup / outlier too (their first call exports MiniLM: warmed up first, ~15 s)
    max_seconds: float  # no call starts after this (the count bound is `cases`)


PROFILES = {
    "short": Knobs(cases=600, batch=100, workers=6, timeout_s=10.0, embeddings=False, max_seconds=120.0),
    "long": Knobs(cases=10_000, batch=500, workers=8, timeout_s=10.0, embeddings=True, max_seconds=840.0),
}
BAD = ("INTERNAL", "UNKNOWN", "HANG")
RSS_GROWTH_LIMIT = 10.0  # percent, after the warm-up
REPRODUCER_BYTES = 256 << 20  # request bodies saved beside the reproducers at most (the JSON recipe always is)
# small limits, so that the valid image requests among the hostile ones take milliseconds on 2 cores
IMAGES = {"max_steps": 8, "default_steps": 2, "max_size": 64, "max_wait_ms": 5.0, "max_caption_tokens": 8}
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]


@dataclass(frozen=True)
class Outcome:
    status: str  # a grpc.StatusCode name, "HANG" or "CLIENT_ERROR"
    seconds: float
    detail: str = ""


def send(channel: grpc.Channel, method: str, bodies: list[bytes], compress: bool, timeout_s: float) -> Outcome:
    """One call through a generic stub (identity serializers: the bytes go out as they are), drained to its end."""
    compression = grpc.Compression.Gzip if compress else None
    shape = hc.METHODS[method][1]
    start = time.monotonic()
    try:
        if shape == "unary":
            channel.unary_unary(method)(bodies[0], timeout=timeout_s, compression=compression)
        elif shape == "server_stream":
            for _ in channel.unary_stream(method)(bodies[0], timeout=timeout_s, compression=compression):
                pass
        else:
            for _ in channel.stream_stream(method)(iter(bodies), timeout=timeout_s, compression=compression):
                pass
    except grpc.RpcError as err:
        seconds = time.monotonic() - start
        status = err.code().name
        if status == "DEADLINE_EXCEEDED" and seconds >= 0.9 * timeout_s:
            status = "HANG"  # the client's deadline passed with no answer
        return Outcome(status, seconds, (err.details() or "")[:300])
    except Exception as err:  # noqa: BLE001 - a client-side failure is counted, never fatal to the run
        return Outcome("CLIENT_ERROR", time.monotonic() - start, f"{type(err).__name__}: {err}"[:300])
    return Outcome("OK", time.monotonic() - start)


def call(channel: grpc.Channel, case: hc.Case, timeout_s: float) -> Outcome:
    return send(channel, case.method, hc.bodies(case), case.compress, timeout_s)


def warmup(channel: grpc.Channel, knobs: Knobs) -> dict[str, str]:
    """One valid request per method, one at a time, before anything is counted: the first Score spawns the quality
    worker process and the first semdedup call exports MiniLM (seconds each), which is start-up, not hostile input.
    Method -> status (each should be OK: the base the one-hostile-field cases start from)."""
    cases = {short_method(m): hc.valid_case(m) for m in hc.METHODS if m != hc.UNKNOWN_METHOD}
    if knobs.embeddings:
        cases["Score semdedup"] = hc.Case(hc.QF + "Score", "field", (("documents", (hc.SMALL_DOCUMENT,)),
                                                                     ("methods", ("semdedup",))))
    return {name: call(channel, case, 120.0).status for name, case in cases.items()}


def bombs() -> list[hc.Case]:
    """The largest messages of the run, each to both big request types, first: the memory baseline (after the first
    batch) then already holds the buffers they need."""
    return [hc.Case(method, "bomb", name, compress=True) for name in hc.BOMBS
            for method in (hc.TG + "Generate", hc.QF + "Score")]


def short_method(method: str) -> str:
    return method.rsplit("/", 1)[1]


class Reproducers:
    """INTERNAL / UNKNOWN / hang cases written down: NNNNN-Method-STATUS.json (the case as a recipe, the status) and
    .bin (the request bytes: the message itself, or gRPC frames for a client stream), bounded in total size."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.paths, self.bytes_saved, self.bodies_skipped = folder, [], 0, 0

    def save(self, index: int, case: hc.Case, outcome: Outcome) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        stem = self.folder / f"{index:05d}-{short_method(case.method)}-{outcome.status}"
        bodies = hc.bodies(case)
        client_stream = hc.METHODS[case.method][1] == "bidi"
        data = b"".join(b"\x00" + len(b).to_bytes(4, "big") + b for b in bodies) if client_stream else bodies[0]
        record = {**hc.describe(case), "status": outcome.status, "detail": outcome.detail,
                  "seconds": round(outcome.seconds, 3), "body": None}
        if self.bytes_saved + len(data) <= REPRODUCER_BYTES:
            stem.with_suffix(".bin").write_bytes(data)
            self.bytes_saved += len(data)
            record["body"] = {"file": stem.with_suffix(".bin").name, "bytes": len(data),
                              "format": "gRPC frames (flag, length, message)" if client_stream else "message"}
        else:
            self.bodies_skipped += 1
        stem.with_suffix(".json").write_text(json.dumps(record, indent=1, default=repr))
        self.paths.append(stem.with_suffix(".json"))


def run(profile: str, out: Path) -> ScenarioResult:
    knobs = PROFILES[profile]
    started = time.monotonic()
    cases = hc.draw_cases(knobs.cases, embeddings=knobs.embeddings)
    draw_seconds = time.monotonic() - started
    batches = [bombs() + cases[:knobs.batch]] + [cases[i:i + knobs.batch]
                                                 for i in range(knobs.batch, len(cases), knobs.batch)]
    reproducers = Reproducers(out / "reproducers")
    counts: dict[str, Counter] = defaultdict(Counter)  # method -> status -> n
    kinds: dict[str, Counter] = defaultdict(Counter)
    details: dict[str, Counter] = defaultdict(Counter)  # "Method STATUS" -> status detail -> n
    samples, notes, slowest = [], [], 0.0
    with served(out, images=IMAGES) as server, grpc.insecure_channel(server.target, CHANNEL_OPTIONS) as channel, \
            ThreadPoolExecutor(knobs.workers, thread_name_prefix="r1") as pool:
        warm_start = time.monotonic()
        warmed = warmup(channel, knobs)
        send_start, index = time.monotonic(), 0
        samples.append(_sample(server, 0, send_start))
        stop_at = started + knobs.max_seconds

        def bounded(case: hc.Case) -> Outcome | None:  # None: not sent, the time bound passed
            return call(channel, case, knobs.timeout_s) if time.monotonic() < stop_at else None

        for number, batch in enumerate(batches):
            for case, outcome in zip(batch, pool.map(bounded, batch), strict=True):
                if outcome is None:
                    continue
                counts[case.method][outcome.status] += 1
                kinds[case.kind][outcome.status] += 1
                slowest = max(slowest, outcome.seconds)
                details[f"{short_method(case.method)} {outcome.status}"][outcome.detail[:100]] += 1
                if outcome.status in BAD:
                    reproducers.save(index, case, outcome)
                index += 1
            samples.append(_sample(server, index, send_start, warm=number == 0))
            if not server.alive():
                notes.append(f"the server exited with {server.server.proc.returncode} after {index} cases")
                break
            if time.monotonic() >= stop_at:
                notes.append(f"stopped after {index} cases: the {knobs.max_seconds:.0f} s bound")
                break
        send_seconds = time.monotonic() - send_start
    if reproducers.bodies_skipped:
        notes.append(f"{reproducers.bodies_skipped} reproducers without their .bin (over "
                     f"{REPRODUCER_BYTES >> 20} MiB): rebuild from the recipe with hostile_cases.bodies")
    if set(warmed.values()) != {"OK"}:
        notes.append(f"a valid request failed in the warm-up: {warmed}")
    if not knobs.embeddings:
        notes.append("semdedup and outlier not drawn in this profile (their first call exports MiniLM, ~15 s)")
    return _result(knobs, out, counts, kinds, details, samples, reproducers, notes,
                   {"draw_seconds": round(draw_seconds, 1), "send_seconds": round(send_seconds, 1),
                    "slowest_call_seconds": round(slowest, 2), "sent": index,
                    "extra_cases": len(batches[0]) - min(knobs.batch, len(cases)), "started": started,
                    "warmup": warmed, "warmup_seconds": round(send_start - warm_start, 1)})


def _sample(server: Served, done: int, since: float, warm: bool = False) -> dict:
    alive = server.alive()
    return {"cases": done, "seconds": round(time.monotonic() - since, 1), "warm": warm,
            "health": server.health() if alive else "EXITED", "rss": server.rss() if alive else None}


def _result(knobs: Knobs, out: Path, counts, kinds, details, samples, reproducers: Reproducers, notes,
            timing: dict) -> ScenarioResult:
    totals = sum(counts.values(), Counter())
    warm = next((s["rss"] for s in samples if s["warm"]), None)
    end = samples[-1]["rss"]
    growth = 100.0 * (end - warm) / warm if warm and end else float("inf")
    checks = samples[1:]
    healthy = sum(s["health"] == "SERVING" for s in checks)
    mib = 1 << 20
    sent = timing["sent"]
    figures = {
        "cases": sent, "bombs_first": timing["extra_cases"], "draw_seconds": timing["draw_seconds"],
        "warmup": timing["warmup"], "warmup_seconds": timing["warmup_seconds"],
        "send_seconds": timing["send_seconds"], "cases_per_second": round(sent / max(timing["send_seconds"], 1e-9), 1),
        "slowest_call_seconds": timing["slowest_call_seconds"], "timeout_seconds": knobs.timeout_s,
        "statuses": dict(totals.most_common()),
        "by_method": {short_method(m): dict(c.most_common()) for m, c in sorted(counts.items())},
        "by_kind": {k: dict(c.most_common()) for k, c in sorted(kinds.items())},
        "details": {k: dict(c.most_common(3)) for k, c in sorted(details.items())},  # "Method STATUS": top 3
        "health_checks": len(checks), "healthy_checks": healthy,
        "unhealthy": [{"cases": s["cases"], "health": s["health"]} for s in checks if s["health"] != "SERVING"],
        "rss_warm_mib": round(warm / mib, 1) if warm else None, "rss_end_mib": round(end / mib, 1) if end else None,
        "rss_max_mib": round(max(s["rss"] or 0 for s in samples) / mib, 1),
        "rss_growth_percent": round(growth, 1),
        "reproducers": len(reproducers.paths),
    }
    goals = [
        Goal(f"all {knobs.cases} hostile cases sent", sent, sent >= knobs.cases + timing["extra_cases"]),
        *(Goal(f"0 {status}" + (f" (no answer within {knobs.timeout_s:.0f} s)" if status == "HANG" else ""),
               totals[status], totals[status] == 0) for status in BAD),
        Goal("SERVING at every health check between batches", f"{healthy}/{len(checks)}",
             bool(checks) and healthy == len(checks)),
        Goal(f"RSS growth after warm-up < {RSS_GROWTH_LIMIT:.0f}%", figures["rss_growth_percent"],
             growth < RSS_GROWTH_LIMIT),
    ]
    return ScenarioResult("R1", "hostile input", figures, goals, _plot(out, samples, totals), reproducers.paths,
                          time.monotonic() - timing["started"], notes)


def _plot(out: Path, samples: list[dict], totals: Counter) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6))
    points = [(s["cases"], s["rss"] / (1 << 20)) for s in samples if s["rss"]]
    left.plot(*zip(*points, strict=True), marker="o")
    for s in samples:
        if s["health"] != "SERVING" and s["cases"]:
            left.axvline(s["cases"], color="red", alpha=0.5)
    left.set(xlabel="hostile requests answered", ylabel="server RSS (MiB)", title="memory (red: not SERVING)")
    names = [name for name, _ in totals.most_common()]
    right.barh(names, [totals[n] for n in names], color=["tab:red" if n in BAD else "tab:blue" for n in names])
    right.set(xscale="log", xlabel="requests", title="answers by status")
    fig.tight_layout()
    path = out / "r1_hostile.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def replay(record: Path, target: str, timeout_s: float = 30.0) -> Outcome:
    """Send a saved reproducer's .bin again, as it was sent."""
    data = json.loads(record.read_text())
    body = (record.parent / data["body"]["file"]).read_bytes()
    messages = [body]
    if hc.METHODS[data["method"]][1] == "bidi":  # gRPC frames back to messages
        messages, at = [], 0
        while at < len(body):
            size = int.from_bytes(body[at + 1:at + 5], "big")
            messages.append(body[at + 5:at + 5 + size])
            at += 5 + size
    with grpc.insecure_channel(target, CHANNEL_OPTIONS) as channel:
        return send(channel, data["method"], messages, data["compress"], timeout_s)


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "replay":
    print(replay(Path(sys.argv[2]), sys.argv[3]))
