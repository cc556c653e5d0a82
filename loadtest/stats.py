"""Pure latency statistics over per-request records (one dict per request, as the locustfile writes them).

TTFT = first non-empty chunk - send; TPOT = (e2e - TTFT) / (output tokens - 1); ITL = gaps between token-bearing
chunks; e2e = send -> last chunk. Percentiles by linear interpolation (numpy's default).

Two selections, so that neither the warm-up nor the drain at the end biases a number:
- latency (TTFT, TPOT, ITL, e2e, errors) covers the requests *started* in the measured window, however long they
  then take (a slow tail that ends after the window still counts);
- throughput (requests/s, output tokens/s, goodput) counts the requests *completed* in the measured window
  [first start + warm-up, last start], over its length: in-flight work at either edge is neither credited to the
  window nor charged to it, and the drain after the load generator stops (fewer requests in flight) is left out.
"""

from __future__ import annotations

import numpy as np

PERCENTILES = (50, 90, 99)


def summarize(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    array = np.asarray(values, dtype=float)
    return {"mean": float(array.mean()), **{f"p{p}": float(np.percentile(array, p)) for p in PERCENTILES}}


def tpot(record: dict) -> float | None:
    if record["ttft"] is None or record["tokens"] < 2:
        return None
    return (record["e2e"] - record["ttft"]) / (record["tokens"] - 1)


def meets(record: dict, slo: dict[str, float]) -> bool:
    """A request counts towards goodput when it succeeded and met every SLO given (seconds; keys ttft, tpot, e2e).
    A bound on a metric the request does not have (TTFT of a unary call) is not met."""
    if record["status"] != "OK":
        return False
    values = {"ttft": record["ttft"], "tpot": tpot(record), "e2e": record["e2e"]}
    return all(values[k] is not None and values[k] <= bound for k, bound in slo.items())


def max_in_flight(records: list[dict]) -> int:
    """The most requests in flight at once (a start at the instant another ends does not overlap it). Closed loop:
    at most the user count; open loop: how far the server fell behind the arrivals."""
    events = sorted([(r["start"] + r["e2e"], -1) for r in records] + [(r["start"], 1) for r in records])
    level = peak = 0
    for _, change in events:
        level += change
        peak = max(peak, level)
    return peak


def measured_window(records: list[dict], warmup_s: float) -> tuple[float, float]:
    """[begin, end]: from `warmup_s` after the first start to the last start (when the load generator stopped)."""
    return min(r["start"] for r in records) + warmup_s, max(r["start"] for r in records)


def kept_records(records: list[dict], warmup_s: float) -> list[dict]:
    """The requests whose latency counts: those started after the warm-up."""
    if not records:
        return []
    begin, _ = measured_window(records, warmup_s)
    return [r for r in records if r["start"] >= begin]


def run_stats(records: list[dict], warmup_s: float, slo: dict[str, float] | None = None) -> dict:
    """Statistics of one run (see the module's docstring for which requests each number covers)."""
    return pooled_stats([records], warmup_s, slo)


def pooled_stats(runs: list[list[dict]], warmup_s: float, slo: dict[str, float] | None = None) -> dict:
    """Statistics over one or more runs of the same model at the same load (rounds): latencies over every run's
    counted requests, rates over the sum of the runs' windows. With `slo`, goodput = requests/s that completed in a
    window, succeeded, and met every bound. Every key is always present (None where there is nothing to measure)."""
    kept_runs = [kept_records(run, warmup_s) for run in runs]
    kept = [r for run in kept_runs for r in run]
    ok = [r for r in kept if r["status"] == "OK"]
    errors: dict[str, int] = {}
    for r in kept:
        if r["status"] != "OK":
            errors[r["status"]] = errors.get(r["status"], 0) + 1
    window, completed = 0.0, []
    for run in filter(None, runs):
        begin, end = measured_window(run, warmup_s)
        window += max(end - begin, 0.0)
        completed += [r for r in run if begin <= r["start"] + r["e2e"] <= end]

    def rate(count: float) -> float | None:
        return count / window if window > 0 else None

    done_ok = [r for r in completed if r["status"] == "OK"]
    return {
        "requests": len(kept), "ok": len(ok), "errors": errors, "window_s": window,
        "max_in_flight": max(map(max_in_flight, kept_runs), default=0),
        "requests_per_s": rate(len(done_ok)),
        "output_tokens_per_s": rate(sum(r["tokens"] for r in done_ok)),
        "output_tokens_mean": float(np.mean([r["tokens"] for r in ok])) if ok else None,
        "ttft_s": summarize([r["ttft"] for r in ok if r["ttft"] is not None]),
        "tpot_s": summarize([t for t in map(tpot, ok) if t is not None]),
        "itl_s": summarize([gap for r in ok for gap in r["itl"]]),
        "e2e_s": summarize([r["e2e"] for r in ok]),
        "goodput_per_s": rate(sum(meets(r, slo) for r in completed)) if slo else None,
    }
