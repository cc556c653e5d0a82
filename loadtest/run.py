"""`prunefusion loadtest`: locust, headless and in its own process, for each model at each concurrency; a report.

    prunefusion loadtest --target localhost:50051 --models tiny-lm tiny-lm-pruned --concurrency 1 4 16 --out runs/lt

Writes results.json, results.csv, report.md, latency_cdf.png and scaling.png into --out; the per-request records
locust wrote stay in --out/records/. The first model is the baseline of the ratio columns; "ideal" is L / L', the
layer ratio the pruned model's speed-up would reach if decoding time were all in the blocks.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

from prunefusion.loadtest.stats import run_stats

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"


def run_locust(target: str, model: str, users: int, args: argparse.Namespace, records: Path) -> str:
    """One headless locust run; returns its output (for diagnostics)."""
    records.unlink(missing_ok=True)
    command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
               "-u", str(users), "-r", str(users), "-t", f"{args.duration}s", "--stop-timeout", "60",
               "--host", target, "--pf-model", model, "--pf-prompt-words", str(args.prompt_words),
               "--pf-max-new-tokens", str(args.max_new_tokens), "--pf-stream-weight", str(args.stream_weight),
               "--pf-unary-weight", str(args.unary_weight), "--pf-cache", args.cache, "--pf-seed", str(args.seed),
               "--pf-records", str(records)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=args.duration + 180)
    if not records.is_file():
        raise RuntimeError(f"locust wrote no records (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return done.stderr


def layer_counts(target: str) -> dict[str, int]:
    from prunefusion_client import Client

    with Client(target, max_attempts=1) as client:
        return {info.name: info.num_layers for info in client.list_models()}


def _row(model: str, users: int, stats: dict) -> dict:
    flat = {"model": model, "concurrency": users, "requests": stats["requests"], "ok": stats.get("ok", 0),
            "errors": sum(stats["errors"].values()), "requests_per_s": stats.get("requests_per_s"),
            "output_tokens_per_s": stats.get("output_tokens_per_s")}
    for metric in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        for key, value in stats.get(metric, {}).items():
            flat[f"{metric[:-2]}_{key}_ms"] = None if value is None else value * 1000
    return flat


def _markdown(rows: list[dict], layers: dict[str, int], models: list[str]) -> list[str]:
    base = models[0]
    lines = ["| model | c | requests | errors | req/s | out tok/s | TTFT p50 / p99 ms | TPOT p50 ms | ITL p99 ms | "
             "e2e p50 / p99 ms | speed vs first (ideal L/L') |", "|---" * 11 + "|"]
    by_key = {(r["model"], r["concurrency"]): r for r in rows}
    for r in rows:
        first = by_key.get((base, r["concurrency"]))
        speed = ""
        if first and first["output_tokens_per_s"] and r["output_tokens_per_s"]:
            ideal = layers.get(base, 0) / layers[r["model"]] if layers.get(r["model"]) else float("nan")
            speed = f"{r['output_tokens_per_s'] / first['output_tokens_per_s']:.2f}x ({ideal:.2f}x)"

        def ms(key: str, r: dict = r) -> str:
            return "" if r.get(key) is None else f"{r[key]:.1f}"

        lines.append(f"| {r['model']} | {r['concurrency']} | {r['requests']} | {r['errors']} | "
                     f"{r['requests_per_s'] or 0:.2f} | {r['output_tokens_per_s'] or 0:.1f} | "
                     f"{ms('ttft_p50_ms')} / {ms('ttft_p99_ms')} | {ms('tpot_p50_ms')} | {ms('itl_p99_ms')} | "
                     f"{ms('e2e_p50_ms')} / {ms('e2e_p99_ms')} | {speed} |")
    return lines


def _plots(records: dict[tuple[str, int], list[dict]], rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4))
    for (model, users), recs in records.items():
        e2e = np.sort([r["e2e"] * 1000 for r in recs if r["status"] == "OK"])
        if len(e2e):
            ax.plot(e2e, np.arange(1, len(e2e) + 1) / len(e2e), label=f"{model}, c={users}")
    ax.set_xlabel("end-to-end latency (ms)")
    ax.set_ylabel("fraction of requests")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "latency_cdf.png", dpi=120)
    plt.close(fig)

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        left.plot([r["concurrency"] for r in mine], [r["output_tokens_per_s"] or 0 for r in mine], "o-", label=model)
        right.plot([r["concurrency"] for r in mine], [r["e2e_p99_ms"] or 0 for r in mine], "o-", label=model)
    left.set_ylabel("output tokens/s")
    right.set_ylabel("e2e p99 (ms)")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency (closed-loop users)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "scaling.png", dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    (out / "records").mkdir(parents=True, exist_ok=True)
    layers = layer_counts(args.target)
    unknown = [m for m in args.models if m not in layers]
    if unknown:
        raise ValueError(f"the server at {args.target} does not serve {unknown}; it serves {sorted(layers)}")
    rows, records = [], {}
    for users in args.concurrency:
        for model in args.models:
            path = out / "records" / f"{model}-c{users}.jsonl"
            run_locust(args.target, model, users, args, path)
            recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            stats = run_stats(recs, args.warmup)
            records[(model, users)] = recs
            rows.append(_row(model, users, stats))
            print(f"{model} c={users}: {stats['requests']} requests after warm-up, errors {stats['errors'] or 0}, "
                  f"{stats.get('output_tokens_per_s') or 0:.1f} output tok/s", flush=True)
    rows.sort(key=lambda r: (r["concurrency"], args.models.index(r["model"])))
    (out / "results.json").write_text(json.dumps({"rows": rows, "layers": layers, "options": vars(args)}, indent=1,
                                                 default=str) + "\n")
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    _plots(records, rows, out)
    table = _markdown(rows, layers, args.models)
    (out / "report.md").write_text("\n".join([
        f"# Load test against {args.target}", "",
        f"Closed-loop locust users, {args.duration} s per run, first {args.warmup} s excluded; prompts of "
        f"{args.prompt_words} words, up to {args.max_new_tokens} output tokens, cache {args.cache}. Layers: "
        + ", ".join(f"{m} {layers[m]}" for m in args.models) + ".", "", *table, "",
        "![latency CDF](latency_cdf.png)", "", "![scaling](scaling.png)", ""]))
    print("\n".join(table))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("loadtest", help="locust load test of a running server, a report per model",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="localhost:50051", help="host:port of a running server")
    p.add_argument("--models", nargs="+", required=True, help="model names; the first is the baseline")
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 16])
    p.add_argument("--duration", type=int, default=30, help="seconds per (model, concurrency) run")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds at the start of each run not counted")
    p.add_argument("--prompt-words", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--stream-weight", type=int, default=1)
    p.add_argument("--unary-weight", type=int, default=0)
    p.add_argument("--cache", default="bypass", choices=["default", "bypass", "refresh"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/loadtest")

    def checked(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except (ValueError, RuntimeError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2

    p.set_defaults(func=checked)
