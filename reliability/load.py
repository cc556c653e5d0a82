"""A closed-loop client load for the fault scenarios (R3, R5): threads that each send one call after another
through their own channel, every call recorded with its send and end times; percentiles; a latency timeline plot.

Times are seconds since the load's `t0` (time.monotonic), so a scenario can mark its faults (a SIGKILL, a SIGTERM)
on the same clock with `load.now()`.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple


@dataclass(frozen=True)
class Call:
    kind: str  # what the thread sends: "load", "stream", "unary", "probe-default", ...
    index: int  # thread number x 1e6 + the thread's call count: consecutive calls of a thread pair up
    sent: float  # seconds since t0
    done: float
    code: str  # "OK" or the gRPC status name (the client's own errors too: "DEADLINE_EXCEEDED", ...)
    finish: str = ""  # the final chunk's / response's finish reason name, "" when the call failed
    cached: bool = False
    source: str = ""  # cache source: "STORED" (a Redis entry), "SHARED" (single-flight), "" (the model ran)
    chunks: int = 0  # messages received (a unary call's one reply included)
    first: float | None = None  # when the first one arrived (seconds since t0): a stalled stream has none early

    @property
    def latency(self) -> float:
        return self.done - self.sent

    @property
    def ok(self) -> bool:
        """Completed: status OK and not ended by the server with a CANCELLED final chunk."""
        return self.code == "OK" and self.finish not in ("", "FINISH_REASON_CANCELLED")


class Outcome(NamedTuple):
    finish: str  # the finish reason's name
    cached: bool
    source: str
    chunks: int = 1
    first: float | None = None  # time.monotonic() of the first message


# A step sends one call with its thread's client and returns its Outcome; an exception is the call's failure (a
# grpc.RpcError's code names it).
Step = Callable[["object", int], Outcome]


class Load:
    """Threads calling their step in a loop until `stop()`, or until `until()` says this thread should stop."""

    def __init__(self, target: str, *, timeout_s: float = 30.0):
        self.target = target
        self.timeout_s = timeout_s
        self.t0 = time.monotonic()
        self.calls: list[Call] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.busy = 0  # threads inside a call now

    def now(self) -> float:
        return time.monotonic() - self.t0

    def start(self, kind: str | Callable[[int], str], step: Step, threads: int = 1, *, think_s: float = 0.0,
              until: Callable[[], bool] | None = None) -> None:
        """`threads` threads sending `step` calls, each waiting `think_s` after a call before its next one; `kind`
        names the calls (a function of the call count for a thread that alternates kinds)."""
        for index in range(threads):
            thread = threading.Thread(target=self._run, args=(kind, step, index, think_s, until), daemon=True,
                                      name=f"load-{kind}-{index}")
            thread.start()
            self._threads.append(thread)

    def _run(self, kind: str | Callable[[int], str], step: Step, index: int, think_s: float,
             until: Callable[[], bool] | None) -> None:
        from prunefusion_client import Client

        # max_attempts=1: no retries, so every refusal is seen and counted
        with Client(self.target, timeout=self.timeout_s, max_attempts=1) as client:
            i = index * 1_000_000  # unique across threads (prompts made from it differ), counting up per thread
            while not self._stop.is_set() and (until is None or not until()):
                sent = self.now()
                with self._lock:
                    self.busy += 1
                try:
                    outcome = step(client, i)
                    code = "OK"
                except Exception as err:  # noqa: BLE001 - every failure is a figure, not a crash of the load
                    outcome = Outcome("", False, "", chunks=getattr(err, "chunks", 0), first=getattr(err, "first",
                                                                                                   None))
                    code = err.code().name if hasattr(err, "code") and callable(err.code) else type(err).__name__
                done = self.now()
                first = None if outcome.first is None else outcome.first - self.t0
                with self._lock:
                    self.busy -= 1
                    name = kind(i) if callable(kind) else kind
                    self.calls.append(Call(name, i, sent, done, code, outcome.finish, outcome.cached, outcome.source,
                                           outcome.chunks, done if first is None and outcome.chunks else first))
                i += 1
                if think_s:
                    self._stop.wait(think_s)

    def stop(self, join_timeout_s: float = 60.0) -> None:
        """Ask every thread to stop after its current call; wait for them (a call ends by its deadline at most)."""
        self._stop.set()
        self.join(join_timeout_s)

    def join(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def snapshot(self) -> list[Call]:
        with self._lock:
            return sorted(self.calls, key=lambda c: c.sent)


class CpuSampler:
    """A process's CPU time (user + system, all threads) every `every_s`, as (time since t0, seconds): whether a
    slow server was busy itself or starved by the host."""

    def __init__(self, pid: int, now: Callable[[], float], every_s: float = 0.1):
        self.samples: list[tuple[float, float]] = []
        self._stat, self._now, self._every_s = Path(f"/proc/{pid}/stat"), now, every_s
        self._tick = os.sysconf("SC_CLK_TCK")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"cpu-{pid}")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                fields = self._stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)"
            except (FileNotFoundError, ProcessLookupError):
                return  # the process is gone
            self.samples.append((self._now(), (int(fields[11]) + int(fields[12])) / self._tick))  # utime, stime
            self._stop.wait(self._every_s)

    def share(self, start: float, end: float) -> float | None:
        """CPU seconds per second between two times (1.0 = one core busy), from the samples nearest inside."""
        inside = [s for s in self.samples if start <= s[0] <= end]
        if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
            return None
        return round((inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0]), 3)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def save_calls(calls: list[Call], path: Path) -> Path:
    """Every call as one JSON line (its fields): the figures' raw data."""
    import json
    from dataclasses import asdict

    path.write_text("".join(json.dumps(asdict(c)) + "\n" for c in calls))
    return path


def unary_step(prompt_of: Callable[[int], str], options) -> Step:
    def step(client, i: int) -> Outcome:
        reply = client.generate(prompt_of(i), "pico", options)
        return _outcome(reply, 1, None)

    return step


def stream_step(prompt_of: Callable[[int], str], options) -> Step:
    def step(client, i: int) -> Outcome:
        last, chunks, first = None, 0, None
        try:
            for chunk in client.generate_stream(prompt_of(i), "pico", options):
                last, chunks = chunk, chunks + 1
                first = first or time.monotonic()
        except Exception as err:
            with contextlib.suppress(AttributeError):  # how far the stream got, for the record
                err.chunks, err.first = chunks, first
            raise
        if last is None:
            raise RuntimeError("the stream ended without a chunk")
        return _outcome(last, chunks, first)

    return step


def _outcome(message, chunks: int, first: float | None) -> Outcome:
    from prunefusion_client.v1 import text_generation_pb2 as pb

    source = pb.CacheSource.Name(message.cache_source).removeprefix("CACHE_SOURCE_") if message.cache_source else ""
    return Outcome(pb.FinishReason.Name(message.finish_reason), bool(message.cached), source, chunks, first)


def pct(values: Iterable[float], q: float) -> float | None:
    """The q-th percentile (0-100, linear interpolation); None for no values."""
    import numpy as np

    values = list(values)
    return float(np.percentile(values, q)) if values else None


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 2)


def plot_timeline(calls: list[Call], path: Path, *, title: str, label: Callable[[Call], str],
                  boundaries: dict[str, float], marks: dict[str, float] | None = None) -> Path:
    """Latency (ms, log scale) of every call against its send time, one colour per label; vertical lines at the
    phase boundaries (name -> time), dotted ones at `marks` (e.g. the first cache hit)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    groups: dict[str, list[Call]] = {}
    for call in calls:
        groups.setdefault(label(call), []).append(call)
    for name, group in sorted(groups.items()):
        ax.scatter([c.sent for c in group], [max(c.latency, 1e-4) * 1000 for c in group], s=6, alpha=0.6,
                   label=f"{name} ({len(group)})", marker="x" if name.startswith("failed") else "o")
    for name, at in boundaries.items():
        ax.axvline(at, color="black", lw=1)
        ax.annotate(name, (at, 1), xycoords=("data", "axes fraction"), xytext=(3, -12), textcoords="offset points",
                    fontsize=8)
    for row, (name, at) in enumerate((marks or {}).items()):
        ax.axvline(at, color="tab:red", lw=1, ls=":")
        ax.annotate(name, (at, 0), xycoords=("data", "axes fraction"), xytext=(3, 4 + 11 * row),
                    textcoords="offset points", fontsize=8, color="tab:red")
    ax.set_yscale("log")
    ax.set_xlabel("time sent (s)")
    ax.set_ylabel("latency (ms)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
