"""`prunefusion loadtest`: locust, headless and in its own process, for each model at each load; a report.

    prunefusion loadtest --target localhost:50051 --models tiny-lm tiny-lm-pruned --concurrency 1 4 16 --out runs/lt
    prunefusion loadtest --serve --models tiny-lm tiny-lm-pruned --rates 1 2 4 --slo-ttft-ms 500 --out runs/lt
    prunefusion loadtest --serve --models transfusion --concurrency 1 4 --caption-weight 1 --out runs/lt-images

Loads: closed loop at each --concurrency (N users, each sending its next request when the last one ends) and open
loop at each --rates (Poisson arrivals, requests/s, regardless of how many are in flight). --serve starts
`prunefusion serve` (the embedded default config, or the config file given) in its own process and stops it at the
end. Text models get GenerateStream/Generate calls, Transfusion models GenerateImage/Caption calls, embedding models
Embed calls.

Writes results.json, results.csv, report.md, latency_cdf.png and scaling.png into --out; the per-request records
locust wrote stay in --out/records/. The first model is the baseline of the ratio columns; "ideal" is L / L', the
layer ratio the pruned model's speed-up would reach if decoding time were all in the blocks. Goodput: requests/s that
succeeded within every --slo-* bound given.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

from prunefusion.loadtest.stats import kept_records, pooled_stats, run_stats
from prunefusion_client import connection

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
QUALITY = "QualityFilter"  # a pseudo-model: --quality load-tests the QualityFilter service's Score


HTTP_SUFFIX = "@http"  # a model's rows through the OpenAI-compatible API: "tiny-lm@http"


def api_of(column: str) -> tuple[str, str]:
    """("tiny-lm", "http") for "tiny-lm@http"; ("tiny-lm", "grpc") for "tiny-lm"."""
    return (column.removesuffix(HTTP_SUFFIX), "http") if column.endswith(HTTP_SUFFIX) else (column, "grpc")


def run_locust(target: str, column: str, load: tuple[str, float], args: argparse.Namespace, records: Path,
               kind: str = "text") -> str:
    """One headless locust run at ("closed", users) or ("open", requests/s); returns its output (diagnostics).
    `column`: a model name, with HTTP_SUFFIX for the HTTP API; `kind`: text, image or embedding."""
    model, api = api_of(column)
    records.unlink(missing_ok=True)
    mode, level = load
    conn = connection.from_args(args)
    users, user_class = (int(level), "PrunefusionUser") if mode == "closed" else (1, "PoissonArrivals")
    none = ["--pf-stream-weight", "0", "--pf-unary-weight", "0"]
    if model == QUALITY:
        weights = [*none, "--pf-score-weight", "1", "--pf-score-docs", str(args.score_docs)]
    elif kind == "embedding":
        weights = [*none, "--pf-embed-weight", "1", "--pf-embed-model", model, "--pf-embed-texts",
                   str(args.embed_texts)]
    elif kind == "image":
        weights = [*none, "--pf-image-weight", str(args.image_weight), "--pf-caption-weight",
                   str(args.caption_weight), "--pf-image-model", model]
    else:
        weights = ["--pf-stream-weight", str(args.stream_weight), "--pf-unary-weight", str(args.unary_weight),
                   "--pf-model", model]
    command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), user_class, "--headless", "--only-summary",
               "-u", str(users), "-r", str(users), "-t", f"{args.duration}s", "--stop-timeout", "60",
               "--host", target, "--pf-prompt-words", str(args.prompt_words),
               "--pf-max-new-tokens", str(args.max_new_tokens), "--pf-cache", args.cache, "--pf-seed", str(args.seed),
               "--pf-image-steps", str(args.image_steps), "--pf-rate", str(level if mode == "open" else 1.0),
               "--pf-records", str(records), *weights, *connection.as_arguments(conn, "pf-"),
               *(["--pf-api", "http", "--pf-http-url", args.http_url] if api == "http" else [])]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.duration + 180,
                              env=connection.child_environment(conn))
    except subprocess.TimeoutExpired as err:
        raise RuntimeError(f"locust did not finish within {args.duration + 180} s ({model}, "
                           f"{load_label(*load)})") from err
    records.with_suffix(".locust.log").write_text(done.stderr)
    # locust exits 1 when some requests failed (counted in the records); anything else, or no request, is a failure
    if done.returncode not in (0, 1) or not records.is_file() or not records.read_text().strip():
        raise RuntimeError(f"locust failed ({model}, {load_label(*load)}; exit {done.returncode}, "
                           f"log {records.with_suffix('.locust.log')}):\n{done.stderr[-2000:]}")
    return done.stderr


def served_models(target: str, conn: connection.Connection | None = None) -> tuple[dict[str, int], set[str],
                                                                                  dict[str, int]]:
    """(text model -> layer count, Transfusion model names, embedding model -> layer count) of the server."""
    from prunefusion_client import Client

    with Client(target, max_attempts=1, connection=conn) as client:
        return ({info.name: info.num_layers for info in client.list_models()},
                {info.name for info in client.list_image_models()},
                {info.name: info.num_layers for info in client.list_embedding_models()})


def load_label(mode: str, level: float) -> str:
    return f"c={int(level)}" if mode == "closed" else f"{level:g}/s"


def _row(model: str, load: tuple[str, float], stats: dict) -> dict:
    mode, level = load
    flat = {"model": model, "mode": mode, "load": load_label(mode, level),
            "concurrency": int(level) if mode == "closed" else None, "offered_rate": level if mode == "open" else None,
            "requests": stats["requests"], "ok": stats["ok"],
            "errors": sum(stats["errors"].values()), "errors_by_status": stats["errors"],
            "requests_per_s": stats["requests_per_s"], "goodput_per_s": stats["goodput_per_s"],
            "output_tokens_per_s": stats["output_tokens_per_s"], "output_tokens_mean": stats["output_tokens_mean"],
            "max_in_flight": stats["max_in_flight"]}
    for metric in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        for key, value in stats[metric].items():
            flat[f"{metric[:-2]}_{key}_ms"] = None if value is None else value * 1000
    return flat


def _same_kind(model: str, base: str, layers: dict[str, int]) -> bool:
    """Text vs text, images vs images; QualityFilter's documents/s compares with nothing else."""
    return model == base or ((model in layers) == (base in layers) and QUALITY not in (model, base))


def _ratio(value: float | None, baseline: float | None) -> str:
    return f"{value / baseline:.2f}" if value and baseline else "-"


def results_table(rows: list[dict], layers: dict[str, int], models: list[str]) -> list[str]:
    """The report's table (markdown lines): a row per (model, load), ratios against the first model."""
    base = models[0]
    lines = ["| model | load | requests | errors | req/s | goodput/s | out tok/s | out tok/req | TTFT p50 / p99 ms | "
             "TPOT p50 ms | ITL p99 ms | e2e p50 / p99 ms | speed vs first (ideal L/L') | TTFT / TPOT / e2e p50 vs "
             "first |", "|---" * 14 + "|"]
    by_key = {(r["model"], r["load"]): r for r in rows}
    for r in rows:
        first = by_key.get((base, r["load"])) if _same_kind(r["model"], base, layers) else None
        speed = latency = ""
        key = "output_tokens_per_s" if r["model"] in layers else "requests_per_s"
        if first and first[key] and r[key]:
            ideal = f" ({layers[base] / layers[r['model']]:.2f}x)" if r["model"] in layers and base in layers else ""
            speed = f"{r[key] / first[key]:.2f}x{ideal}"
            if len(r["throughput_by_round"]) > 1:
                speed += "; rounds " + " / ".join(_ratio(a, b) for a, b in zip(
                    r["throughput_by_round"], first["throughput_by_round"], strict=True))
            latency = " / ".join(_ratio(r[f"{m}_p50_ms"], first[f"{m}_p50_ms"]) for m in ("ttft", "tpot", "e2e"))

        def number(key: str, digits: int = 1, r: dict = r) -> str:
            return "" if r.get(key) is None else f"{r[key]:.{digits}f}"

        errors = ", ".join(f"{n} {code}" for code, n in r["errors_by_status"].items()) or "0"
        lines.append(f"| {r['model']} | {r['load']} | {r['requests']} | {errors} | {number('requests_per_s', 2)} | "
                     f"{number('goodput_per_s', 2)} | {number('output_tokens_per_s')} | "
                     f"{number('output_tokens_mean')} | {number('ttft_p50_ms')} / {number('ttft_p99_ms')} | "
                     f"{number('tpot_p50_ms')} | {number('itl_p99_ms')} | {number('e2e_p50_ms')} / "
                     f"{number('e2e_p99_ms')} | {speed} | {latency} |")
    return lines


def _cdf(ax, values: list[float], label: str) -> None:
    import numpy as np

    if values:
        ax.plot(np.sort(values), np.arange(1, len(values) + 1) / len(values), label=label)


def _plots(runs: dict[tuple[str, str], list[list[dict]]], rows: list[dict], layers: dict[str, int],
           warmup_s: float, out: Path) -> None:
    """latency_cdf.png: e2e and TTFT CDFs of the requests the table counts; scaling.png: throughput and e2e p99
    against the load, per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (e2e_ax, ttft_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for (model, load), model_runs in runs.items():
        ok = [r for recs in model_runs for r in kept_records(recs, warmup_s) if r["status"] == "OK"]
        _cdf(e2e_ax, [r["e2e"] * 1000 for r in ok], f"{model}, {load}")
        _cdf(ttft_ax, [r["ttft"] * 1000 for r in ok if r["ttft"] is not None], f"{model}, {load}")
    for ax, name in ((e2e_ax, "end-to-end latency (ms)"), (ttft_ax, "time to first token (ms), streams")):
        ax.set_xlabel(name)
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "latency_cdf.png", dpi=120)
    plt.close(fig)

    modes = [m for m in ("closed", "open") if any(r["mode"] == m for r in rows)]
    fig, axes = plt.subplots(len(modes), 2, figsize=(10, 4 * len(modes)), squeeze=False)
    for (left, right), mode in zip(axes, modes, strict=True):
        x_key = "concurrency" if mode == "closed" else "offered_rate"
        for model in dict.fromkeys(r["model"] for r in rows):
            mine = [r for r in rows if r["model"] == model and r["mode"] == mode]
            y_key = "output_tokens_per_s" if model in layers else "requests_per_s"  # Score: documents/s
            left.plot([r[x_key] for r in mine], [r[y_key] or 0 for r in mine], "o-",
                      label=f"{model} ({y_key.replace('_per_s', '/s').replace('_', ' ')})")
            right.plot([r[x_key] for r in mine], [r["e2e_p99_ms"] or 0 for r in mine], "o-", label=model)
        left.set_ylabel("throughput")
        right.set_ylabel("e2e p99 (ms)")
        for ax in (left, right):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrency (closed-loop users)" if mode == "closed" else "offered rate (requests/s)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "scaling.png", dpi=120)
    plt.close(fig)


def _slo(args: argparse.Namespace) -> dict[str, float]:
    bounds = {"ttft": args.slo_ttft_ms, "tpot": args.slo_tpot_ms, "e2e": args.slo_e2e_ms}
    return {k: v / 1000 for k, v in bounds.items() if v is not None}


def run(args: argparse.Namespace) -> int:
    if args.serve is None:
        return run_against(args.target, args)
    from prunefusion.loadtest.server_process import ServerProcess

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = None if args.serve == "default" else Path(args.serve)
    print(f"starting prunefusion serve ({args.serve} config; log: {out / 'server.log'})", flush=True)
    with ServerProcess(config, log=out / "server.log", connection=connection.from_args(args)) as server:
        args.http_url = args.http_url or server.http_url
        return run_against(server.target, args)


def _summary(args: argparse.Namespace, loads: list[tuple[str, float]], slo: dict[str, float],
             layers: dict[str, int], embedding_models: set[str]) -> str:
    """The report's opening paragraph: what was run and what each column counts."""
    slo_text = ", ".join(f"{k} <= {v * 1000:g} ms" for k, v in slo.items()) or "none given"
    quality = (f" {QUALITY} rows: Score calls of {args.score_docs} documents; their 'out tok/s' is documents/s."
               if args.quality else "")
    if embedding_models & set(args.models):
        quality += (f" Embedding rows: Embed calls of {args.embed_texts} texts of {args.prompt_words} words; their "
                    "'out tok/s' is texts/s.")
    return (f"Loads: {', '.join(load_label(*x) for x in loads)} (c = closed-loop users; /s = open-loop Poisson "
            f"arrivals). {args.duration} s per run, {args.rounds} round(s) (models in alternating order; rows "
            f"pool the rounds), first {args.warmup} s of each run excluded; text prompts of "
            f"{args.prompt_words} words, up to {args.max_new_tokens} output tokens, cache {args.cache}; images "
            f"{args.image_steps} steps. SLOs for goodput: {slo_text}. Latency columns cover the requests started "
            "after the warm-up; req/s, out tok/s and goodput count the requests completed between the warm-up's end "
            "and the last request's start. 'vs first' columns compare with the first model at the same load: speed "
            "as a throughput ratio (higher is faster), latencies as p50 ratios (lower is faster). Layers: "
            + ", ".join(f"{m} {layers[m]}" for m in args.models if m in layers) + "." + quality)


def run_against(target: str, args: argparse.Namespace) -> int:
    out = Path(args.out)
    (out / "records").mkdir(parents=True, exist_ok=True)
    text_layers, image_models, embedding_layers = served_models(target, connection.from_args(args))
    layers = {**text_layers, **embedding_layers}  # both count items per second: tokens, or texts embedded
    if not layers and not image_models:
        raise RuntimeError(f"the server at {target} serves no model yet (still loading? it reports NOT_SERVING "
                           "until its models are ready)")
    models = list(args.models) + ([QUALITY] if args.quality else [])
    if not models:
        raise ValueError("nothing to test: name --models and/or --quality")
    unknown = [m for m in models if m not in layers and m not in image_models and m != QUALITY]
    if "http" in args.apis:
        if any(m not in text_layers for m in models):
            raise ValueError("--apis http load-tests text models only")
        args.http_url = args.http_url or f"http://{target.rpartition(':')[0] or '127.0.0.1'}:8000"
        # each model through gRPC, then through HTTP: one run compares the two front ends on the same engine
        suffixes = [suffix for api, suffix in (("grpc", ""), ("http", HTTP_SUFFIX)) if api in args.apis]
        models = [m + suffix for m in models for suffix in suffixes]
        layers = {**layers, **{m + HTTP_SUFFIX: n for m, n in text_layers.items()}}
    if unknown:
        raise ValueError(f"the server at {target} does not serve {unknown}; it serves "
                         f"{sorted(layers) + sorted(image_models)}")
    loads = [("closed", float(c)) for c in args.concurrency] + [("open", float(r)) for r in args.rates]
    if args.rounds < 1:
        raise ValueError(f"--rounds must be at least 1; got {args.rounds}")
    slo = _slo(args)
    runs: dict[tuple[str, str], list[list[dict]]] = {}  # (model, load label) -> one record list per round
    round_stats: dict[tuple[str, str], list[dict]] = {}  # ... -> each round's own statistics
    for round_index in range(args.rounds):
        for load in loads:
            label = load_label(*load)
            # rounds alternate the models' order, so a machine that drifts during the test favours none of them
            for model in models if round_index % 2 == 0 else models[::-1]:
                suffix = f"-r{round_index + 1}" if args.rounds > 1 else ""
                path = out / "records" / f"{model}-{label.replace('=', '').replace('/s', 'rps')}{suffix}.jsonl"
                kind = "image" if model in image_models else "embedding" if model in embedding_layers else "text"
                run_locust(target, model, load, args, path, kind)
                recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
                runs.setdefault((model, label), []).append(recs)
                stats = run_stats(recs, args.warmup, slo)
                round_stats.setdefault((model, label), []).append(stats)
                print(f"{model} {label}{suffix}: {stats['requests']} requests after warm-up, errors "
                      f"{stats['errors'] or 0}, {stats['requests_per_s'] or 0:.2f} req/s, "
                      f"{stats['output_tokens_per_s'] or 0:.1f} output tok/s", flush=True)
    rows = []
    for load in loads:
        for model in models:
            key = "output_tokens_per_s" if model in layers else "requests_per_s"
            row = _row(model, load, pooled_stats(runs[(model, load_label(*load))], args.warmup, slo))
            row["throughput_by_round"] = [stats[key] for stats in round_stats[(model, row["load"])]]
            rows.append(row)
    (out / "results.json").write_text(json.dumps({"rows": rows, "layers": layers, "slo_s": slo,
                                                 "options": vars(args)}, indent=1, default=str) + "\n")
    with (out / "results.csv").open("w", newline="") as f:
        fields = [k for k in dict.fromkeys(k for r in rows for k in r) if k != "errors_by_status"]
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    _plots(runs, rows, layers, args.warmup, out)
    table = results_table(rows, layers, models)
    (out / "report.md").write_text("\n".join([f"# Load test against {target}", "",
                                              _summary(args, loads, slo, layers, set(embedding_layers)),
                                              "", *table, "", "![latency CDF](latency_cdf.png)", "",
                                              "![scaling](scaling.png)", ""]))
    print("\n".join(table))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("loadtest", help="locust load test of a running server, a report per model",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="localhost:50051", help="host:port of a running server")
    connection.add_arguments(p)
    p.add_argument("--serve", nargs="?", const="default", help="start `prunefusion serve` for the test (the embedded "
                   "default config, or this config file) instead of using --target")
    p.add_argument("--models", nargs="*", default=[], help="model names; the first is the baseline")
    p.add_argument("--apis", nargs="+", default=["grpc"], choices=["grpc", "http"],
                   help="front ends to load: `grpc http` runs each text model through both (rows MODEL and "
                   "MODEL@http, interleaved in rounds)")
    p.add_argument("--http-url", help="the OpenAI-compatible API's base URL (default: --target's host, port 8000; "
                   "with --serve: the started server's)")
    p.add_argument("--quality", action="store_true", help="also load-test QualityFilter.Score")
    p.add_argument("--score-docs", type=int, default=16, help="documents per Score call (~1 KB each)")
    p.add_argument("--embed-texts", type=int, default=8, help="texts per Embed call (embedding models)")
    p.add_argument("--concurrency", nargs="*", type=int, default=[1, 4, 16], help="closed-loop user counts")
    p.add_argument("--rates", nargs="*", type=float, default=[], help="open-loop Poisson arrival rates (requests/s)")
    p.add_argument("--duration", type=int, default=30, help="seconds per (model, concurrency) run")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds at the start of each run not counted")
    p.add_argument("--rounds", type=int, default=1, help="repeat every run this many times, alternating the models' "
                   "order; rows pool the rounds and show each round's speed ratio")
    p.add_argument("--prompt-words", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--stream-weight", type=int, default=1)
    p.add_argument("--unary-weight", type=int, default=0)
    p.add_argument("--image-weight", type=int, default=1, help="Transfusion models: GenerateImage share")
    p.add_argument("--caption-weight", type=int, default=0, help="Transfusion models: Caption share")
    p.add_argument("--image-steps", type=int, default=20)
    p.add_argument("--slo-ttft-ms", type=float, help="goodput: time to first token bound")
    p.add_argument("--slo-tpot-ms", type=float, help="goodput: time per output token bound")
    p.add_argument("--slo-e2e-ms", type=float, help="goodput: end-to-end latency bound")
    p.add_argument("--cache", default="bypass", choices=["default", "bypass", "refresh"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/loadtest")

    def checked(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except RuntimeError as err:  # a server that serves nothing, a locust run that failed (bad input: main's)
            print(f"error: {err}", file=sys.stderr)
            return 2

    p.set_defaults(func=checked)
