"""R7: adversarial documents through a real server's QualityFilter.Score: seconds per size and shape (up to 1 MB),
whether time grows linearly, the server's peak memory (its processes together), and how soon a Score that is
cancelled or runs past its deadline frees its scoring worker.

The documents are quality.rule_corpus.ADVERSARIAL's shapes (runs of punctuation without whitespace, colons, only
whitespace, many short lines, ...), which cost the rules most per character; before issue 17's fix one ~60 KB
document kept a worker busy ~50 s. The server has one scoring worker (so the next Score after a cancelled one can
only run once that worker is free) and the default per-document bound (quality.max_document_bytes, 256 KiB):
larger documents are answered unscored (document_too_long), which is what keeps a 1 MB document under a second.
Linearity is judged between the two largest scored sizes: t(4n) / t(n) < 8 (4 when linear, 16 when quadratic).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from prunefusion.reliability import common
from prunefusion.reliability.base import Goal, ScenarioResult

KB = 1000  # sizes in characters (ASCII: bytes); 256 KB = 256,000 < 256 KiB, the server's per-document bound
DOCUMENT_BOUND = 256 << 10  # set in the config as quality.max_document_bytes (the default's value)
FREED_WITHIN_S = 1.0
ANSWERED_WITHIN_S = 1.0
LINEAR_RATIO = 8.0


@dataclass(frozen=True)
class Knobs:
    sizes_kb: tuple[int, ...]  # each shape at each size, one document per Score
    shapes: tuple[str, ...]  # names in ADVERSARIAL
    repeats: int  # the best of this many Scores per point
    busy_documents: int  # the batch that is cancelled: this many distinct documents ...
    busy_document_kb: int  # ... of random punctuation each (seconds of work on 2 cores)
    cancel_after_s: float  # the cancelled Score runs this long first
    deadline_s: float  # the Score that runs past its deadline has this one
    unbounded_sizes_kb: tuple[int, ...] = ()  # again on a server without the per-document bound (its true cost)


PROFILES = {
    "short": Knobs(sizes_kb=(16, 64, 256, 1024), shapes=("random_punctuation", "bangs_questions", "quotes_dots",
                                                        "colons", "short_lines", "dots_in_a_sentence"),
                   repeats=1, busy_documents=8, busy_document_kb=200, cancel_after_s=1.0, deadline_s=1.0),
    "long": Knobs(sizes_kb=(4, 16, 64, 128, 256, 512, 1024), shapes=(), repeats=3, busy_documents=16,
                  busy_document_kb=250, cancel_after_s=2.0, deadline_s=2.0,  # shapes (): every shape
                  unbounded_sizes_kb=(64, 256, 1024)),
}


def run(profile: str, out: Path) -> ScenarioResult:
    from prunefusion.quality.rule_corpus import ADVERSARIAL

    knobs = PROFILES[profile]
    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    shapes = knobs.shapes or tuple(ADVERSARIAL)
    model_dir = common.build_pico_lm(out.parent / "pico-lm")
    config = common.write_config(out / "config.yaml", model_dir, quality={"workers": 1, "max_concurrent_batches": 2,
                                                                          "max_document_bytes": DOCUMENT_BOUND})
    server = common.serve(config, out / "server.log")
    memory = _MemorySampler(server.proc.pid)
    try:
        from prunefusion_client import Client

        with Client(server.target, timeout=120, max_attempts=1) as client:
            _small_score(client)  # the worker (and its forkserver) started: not part of any figure
            memory.start()
            seconds, verdicts = _time_shapes(client, shapes, knobs, ADVERSARIAL)
            freed = {"cancelled": _freed_after_cancel(server.target, knobs, ADVERSARIAL),
                     "deadline": _freed_after_deadline(client, knobs, ADVERSARIAL)}
            health = _health(server.target)
    finally:
        memory.stop()
        server.stop()
    figures = _figures(seconds, verdicts, knobs, shapes, freed, health, memory)
    unbounded = {}
    if knobs.unbounded_sizes_kb:
        unbounded = _without_bound(model_dir, out / "without-bound", shapes, knobs, ADVERSARIAL)
        figures["seconds_without_bound"] = unbounded
        figures["linearity_ratio_without_bound"] = _ratios(unbounded, shapes, list(knobs.unbounded_sizes_kb))
    goals = [
        Goal(f"a 1 MB adversarial document is answered in < {ANSWERED_WITHIN_S:g} s (every shape)",
             figures["megabyte_seconds_max"], figures["megabyte_seconds_max"] < ANSWERED_WITHIN_S),
        Goal(f"scoring time grows linearly: t(4n) / t(n) < {LINEAR_RATIO:g} for every shape",
             figures["linearity_ratio_max"], figures["linearity_ratio_max"] < LINEAR_RATIO),
        Goal(f"a cancelled or expired Score frees its worker within {FREED_WITHIN_S:g} s", figures["freed_seconds_max"],
             figures["freed_seconds_max"] < FREED_WITHIN_S),
        Goal("QualityFilter health SERVING after workers were killed", health, health == "SERVING"),
    ]
    notes = ["Image inputs (Multimodal Caption) are not part of R7: R1's raw-bytes cases cover them.",
             f"Documents over quality.max_document_bytes ({DOCUMENT_BOUND} bytes, the default) are answered unscored "
             "(document_too_long): the 1 MB figures are that path; linearity is judged on the scored sizes.",
             "Before the fix (issue 17): 4,000 '!?' took 1.7 s in a rule, 16,000 took 28 s; 16,000 '.\"' 75 s."]
    return ScenarioResult("R7", "adversarial documents", figures, goals, [_plot(out, seconds, unbounded, shapes)], [],
                          time.monotonic() - started, notes)


def _without_bound(model_dir: Path, out: Path, shapes, knobs: Knobs, adversarial) -> dict:
    """Seconds per shape and size on a server with quality.max_document_bytes null: what the rules cost."""
    from dataclasses import replace

    from prunefusion_client import Client

    out.mkdir(parents=True, exist_ok=True)
    config = common.write_config(out / "config.yaml", model_dir,
                                 quality={"workers": 1, "max_document_bytes": None})
    server = common.serve(config, out / "server.log")
    try:
        with Client(server.target, timeout=600, max_attempts=1) as client:
            _small_score(client)
            return _time_shapes(client, shapes, replace(knobs, sizes_kb=knobs.unbounded_sizes_kb), adversarial)[0]
    finally:
        server.stop()


def _small_score(client) -> None:
    from prunefusion_client import score_request

    reply = client.score(score_request([("small", "A short clean sentence is here. It ends well. Yes.")]))
    assert len(reply.results) == 1


def _time_shapes(client, shapes, knobs: Knobs, adversarial) -> tuple[dict, dict]:
    """(shape -> size in KB -> best seconds of a Score, shape -> size -> reasons of the answer)."""
    from prunefusion_client import score_request

    seconds: dict[str, dict[int, float]] = {}
    verdicts: dict[str, dict[int, list[str]]] = {}
    for shape in shapes:
        for size in knobs.sizes_kb:
            text = adversarial[shape](size * KB)
            best = float("inf")
            for _ in range(knobs.repeats):
                begun = time.perf_counter()
                reply = client.score(score_request([(shape, text)]))
                best = min(best, time.perf_counter() - begun)
            seconds.setdefault(shape, {})[size] = round(best, 4)
            verdicts.setdefault(shape, {})[size] = list(reply.results[0].reasons)
    return seconds, verdicts


def _busy_request(knobs: Knobs, adversarial):
    """Distinct documents (rotations of one), so that no tokenizer cache makes them cheap."""
    from prunefusion_client import score_request

    base = adversarial["random_punctuation"](knobs.busy_document_kb * KB)
    return score_request([(str(i), base[i * 997:] + base[:i * 997]) for i in range(knobs.busy_documents)])


def _seconds_until_a_small_score(client) -> float:
    begun = time.monotonic()
    _small_score(client)
    return round(time.monotonic() - begun, 3)


def _freed_after_cancel(target: str, knobs: Knobs, adversarial) -> float:
    """A busy Score cancelled by its client after `cancel_after_s`: seconds until a small Score is answered."""
    import grpc

    from prunefusion_client import Client
    from prunefusion_client.v1 import quality_filter_pb2_grpc

    request = _busy_request(knobs, adversarial)
    with grpc.insecure_channel(target) as channel:
        call = quality_filter_pb2_grpc.QualityFilterStub(channel).Score.future(request, timeout=120)
        time.sleep(knobs.cancel_after_s)
        call.cancel()
    with Client(target, timeout=60, max_attempts=1) as client:
        return _seconds_until_a_small_score(client)


def _freed_after_deadline(client, knobs: Knobs, adversarial) -> float:
    """A busy Score with a `deadline_s` deadline (DEADLINE_EXCEEDED expected): seconds until a small Score."""
    import grpc

    request = _busy_request(knobs, adversarial)
    try:
        client.score(request, timeout=knobs.deadline_s)
        return float("nan")  # answered in time: the batch was not busy enough to measure anything
    except grpc.RpcError as err:
        if err.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
            raise
    return _seconds_until_a_small_score(client)


def _health(target: str) -> str:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    time.sleep(1.5)  # the server's health watcher looks every second
    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="prunefusion.v1.QualityFilter"), timeout=5)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


class _MemorySampler:
    """The server's processes (it, the scoring forkserver and workers) sampled every 50 ms: the peak of their summed
    resident memory, and the largest single high-water mark (VmHWM) seen."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak_total, self.peak_single = pid, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            for pid in _tree(self.pid):
                try:
                    rss, hwm = common.status_kb(pid, "VmRSS"), common.status_kb(pid, "VmHWM")
                except (OSError, ValueError):  # a worker that ended between the listing and the read (a zombie
                    continue                   # has no Vm fields)
                total += rss
                self.peak_single = max(self.peak_single, hwm)
            self.peak_total = max(self.peak_total, total)
            self._stop.wait(0.05)


def _tree(root: int) -> list[int]:
    """`root` and its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def _figures(seconds, verdicts, knobs: Knobs, shapes, freed, health, memory: _MemorySampler) -> dict:
    top = max(knobs.sizes_kb)
    scored = [s for s in knobs.sizes_kb if all("document_too_long" not in verdicts[shape][s] for shape in shapes)]
    ratios = _ratios(seconds, shapes, scored)
    return {
        "seconds": seconds,
        "microseconds_per_byte": {shape: {s: round(t / (s * KB) * 1e6, 3) for s, t in by_size.items()}
                                  for shape, by_size in seconds.items()},
        "reasons": {shape: {s: r[:3] for s, r in by_size.items()} for shape, by_size in verdicts.items()},
        "scored_sizes_kb": scored,
        "linearity_ratio": ratios,
        "linearity_ratio_max": max(ratios.values(), default=float("inf")),
        "megabyte_seconds_max": max(seconds[shape][top] for shape in shapes) if top >= 1000 else float("nan"),
        "freed_seconds": freed,
        "freed_seconds_max": max(freed.values()),
        "quality_health": health,
        "peak_rss_mb_all_processes": round(memory.peak_total / 1024, 1),
        "peak_vmhwm_mb_one_process": round(memory.peak_single / 1024, 1),
    }


def _ratios(seconds: dict, shapes, sizes: list[int]) -> dict[str, float]:
    """t(largest) / t(next largest) per shape, normalised to a 4x step: 4 when linear, 16 when quadratic."""
    if len(sizes) < 2:
        return {}
    small, large = sizes[-2], sizes[-1]
    return {shape: round(seconds[shape][large] / max(seconds[shape][small], 1e-4) * 4 * small / large, 2)
            for shape in shapes}


def _plot(out: Path, seconds, unbounded, shapes) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for shape in shapes:
        sizes = sorted(seconds[shape])
        line, = ax.plot(sizes, [max(seconds[shape][s], 1e-4) for s in sizes], marker="o", label=shape)
        if shape in unbounded:
            sizes = sorted(unbounded[shape])
            ax.plot(sizes, [max(unbounded[shape][s], 1e-4) for s in sizes], marker="x", ls="--",
                    color=line.get_color(), label=f"{shape}, no bound")
    ax.axvline(DOCUMENT_BOUND / KB, color="black", lw=1, ls=":")
    ax.annotate("max_document_bytes: larger ones unscored", (DOCUMENT_BOUND / KB, 0.02),
                xycoords=("data", "axes fraction"),
                xytext=(-4, 4), textcoords="offset points", fontsize=8, ha="right")
    sizes = sorted({s for by_size in seconds.values() for s in by_size})
    if sizes:  # a linear guide through the first point of the slowest shape
        first = max(seconds[shape][sizes[0]] for shape in shapes)
        ax.plot(sizes, [first * s / sizes[0] for s in sizes], color="gray", lw=0.8, ls="--", label="linear")
    ax.set(xscale="log", yscale="log", xlabel="document size (KB)", ylabel="Score seconds (best of repeats)",
           title="R7: adversarial documents through QualityFilter.Score")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    path = out / "r7_adversarial.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
