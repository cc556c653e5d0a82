"""`prunefusion score` on the local executor against Ray, with 1 and 2 workers, on this machine; peak memory per
worker on a corpus and on one `--scale` times larger.

Each run is a fresh `prunefusion score` process (its own Ray, started and shut down) over a seeded JSONL corpus
(`mixed_corpus` + 10% near-duplicates, default methods, --drop-bottom-percent 10 --long-files 2). Configurations
run in interleaved rounds, the order rotating each round; ratios are per round, reported as median [min, max].
Two throughputs: end to end (pass 1 from the command's start of scoring to its last unit, worker start-up and
Ray's start included) and the scoring span (first unit started to last unit finished, from the units' own
timestamps: start-up excluded). Goal: 2 Ray workers >= 1.8x 1 Ray worker.

    .venv/bin/python benchmarks/quality_ray.py [--documents 6000] [--rounds 3] [--batch-size 256] [--scale 4]
        [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {"local-1": ("local", 1), "local-2": ("local", 2), "ray-1": ("ray", 1), "ray-2": ("ray", 2)}
RATIOS = {"ray-2 / ray-1": ("ray-2", "ray-1"), "local-2 / local-1": ("local-2", "local-1"),
          "ray-1 / local-1": ("ray-1", "local-1"), "ray-2 / local-2": ("ray-2", "local-2")}


def write_corpus(path: Path, n: int, seed: int) -> None:
    from prunefusion.quality.mixed_corpus import mixed_corpus, with_near_duplicates

    docs = with_near_duplicates(mixed_corpus(round(n / 1.1), seed=seed), fraction=0.1, seed=seed)
    path.write_text("".join(json.dumps({"id": f"d{i}", "text": d.text}) + "\n" for i, d in enumerate(docs)))


def run_once(corpus: Path, executor: str, workers: int, batch_size: int, tmp: Path) -> dict:
    """One `prunefusion score` process; its summary, scoring span and per-worker peak memory."""
    work, out = Path(tempfile.mkdtemp(dir=tmp)), tmp / "kept.jsonl"
    command = [str(Path(sys.executable).parent / "prunefusion"), "score", str(corpus), "--out", str(out),
               "--executor", executor, "--workers", str(workers), "--batch-size", str(batch_size), "--work", str(work),
               "--report", str(work / "report"), "--drop-bottom-percent", "10", "--long-files", "2"]
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    summary = json.loads((work / "report" / "summary.json").read_text())
    units = [json.loads(p.read_text()) for p in (work / "units").glob("u*.json")]
    span = max(u["finished"] for u in units) - min(u["started"] for u in units)
    docs = summary["documents"]
    return {"documents": docs, "command_s": wall, "pass1_s": summary["seconds"], "span_s": span,
            "docs_per_s": docs / summary["seconds"], "span_docs_per_s": docs / span,
            "workers_seen": len(summary["peak_rss_mb_per_worker"]),
            "peak_rss_mb_per_worker": sorted(summary["peak_rss_mb_per_worker"].values())}


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--documents", type=int, default=6000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--scale", type=int, default=4, help="the memory check's larger corpus: this many times larger")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        corpus = tmp / "corpus.jsonl"
        write_corpus(corpus, args.documents, args.seed)
        runs: dict[str, list[dict]] = {name: [] for name in CONFIGS}
        names = list(CONFIGS)
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                runs[name].append(run_once(corpus, *CONFIGS[name], args.batch_size, tmp))
                last = runs[name][-1]
                print(f"round {r}: {name:<8} {last['docs_per_s']:7.0f} docs/s end to end, "
                      f"{last['span_docs_per_s']:7.0f} over the scoring span, peak RSS/worker "
                      f"{max(last['peak_rss_mb_per_worker']):.0f} MB", flush=True)
        ratios = {}
        for label, (a, b) in RATIOS.items():
            ratios[label] = {kind: spread([x[kind] / y[kind] for x, y in zip(runs[a], runs[b], strict=True)])
                             for kind in ("docs_per_s", "span_docs_per_s")}
        big = tmp / "big.jsonl"
        write_corpus(big, args.documents * args.scale, args.seed + 1)
        memory = {f"{n} docs": run_once(c, "ray", 2, args.batch_size, tmp)
                  for n, c in ((args.documents, corpus), (args.documents * args.scale, big))}
    result = {"machine": platform.processor() or platform.machine(), "documents": args.documents,
              "batch_size": args.batch_size, "rounds": args.rounds, "runs": runs, "ratios": ratios,
              "memory_ray_2_workers": memory}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality_ray.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n{args.documents} documents, units of {args.batch_size}, {args.rounds} interleaved rounds")
    print(f"{'config':<9} {'end-to-end docs/s':>20} {'scoring-span docs/s':>22}")
    for name in CONFIGS:
        e2e, sp = spread([x["docs_per_s"] for x in runs[name]]), spread([x["span_docs_per_s"] for x in runs[name]])
        print(f"{name:<9} {e2e['median']:8.0f} [{e2e['min']:.0f}, {e2e['max']:.0f}]"
              f" {sp['median']:10.0f} [{sp['min']:.0f}, {sp['max']:.0f}]")
    for label, kinds in ratios.items():
        e2e, sp = kinds["docs_per_s"], kinds["span_docs_per_s"]
        print(f"{label:<18} end to end {e2e['median']:.2f}x [{e2e['min']:.2f}, {e2e['max']:.2f}]; "
              f"scoring span {sp['median']:.2f}x [{sp['min']:.2f}, {sp['max']:.2f}]")
    for label, m in memory.items():
        print(f"ray-2 on {label:<12} peak RSS per worker {', '.join(f'{v:.0f}' for v in m['peak_rss_mb_per_worker'])}"
              " MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
