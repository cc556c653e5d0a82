"""Pure latency statistics over per-request records (one dict per request, as the locustfile writes them).

TTFT = first non-empty chunk - send; TPOT = (e2e - TTFT) / (output tokens - 1); ITL = gaps between token-bearing
chunks; e2e = send -> last chunk. Percentiles by linear interpolation (numpy's default).
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


def run_stats(records: list[dict], warmup_s: float, slo: dict[str, float] | None = None) -> dict:
    """Statistics of one run: records started within `warmup_s` of the first request are dropped. With `slo`,
    goodput = requests/s that succeeded within every bound."""
    if not records:
        return {"requests": 0, "errors": {}, "window_s": 0.0}
    begin = min(r["start"] for r in records) + warmup_s
    kept = [r for r in records if r["start"] >= begin]
    ok = [r for r in kept if r["status"] == "OK"]
    errors: dict[str, int] = {}
    for r in kept:
        if r["status"] != "OK":
            errors[r["status"]] = errors.get(r["status"], 0) + 1
    window = max((r["start"] + r["e2e"] for r in kept), default=begin) - begin
    tokens = sum(r["tokens"] for r in ok)
    return {
        "requests": len(kept), "ok": len(ok), "errors": errors, "window_s": window,
        "requests_per_s": len(ok) / window if window > 0 else None,
        "output_tokens_per_s": tokens / window if window > 0 else None,
        "ttft_s": summarize([r["ttft"] for r in ok if r["ttft"] is not None]),
        "tpot_s": summarize([t for t in map(tpot, ok) if t is not None]),
        "itl_s": summarize([gap for r in ok for gap in r["itl"]]),
        "e2e_s": summarize([r["e2e"] for r in ok]),
        "goodput_per_s": (sum(meets(r, slo) for r in kept) / window if window > 0 else None) if slo else None,
    }
