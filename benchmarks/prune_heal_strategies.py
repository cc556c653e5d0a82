"""Angular vs simple vs random block at the same size, before and after the same healing: the default compression
job (compression/jobs/tiny-lm-angular-25.yaml) run once per strategy, everything else equal.

    .venv/bin/python benchmarks/prune_heal_strategies.py [--out runs/strategies] [--random-seed 1] [--steps N]

Prints held-out perplexity of the original, pruned and healed model per strategy and the share of the perplexity
gap healing recovered. Each job's report.md stays in --out. Reruns resume unfinished jobs and reuse finished ones.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from prunefusion.compression.job import run_job
from prunefusion.compression.job_report import gap_recovered
from prunefusion.compression.records import JobManifest
from prunefusion.models.builds import packaged_jobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", default="tiny-lm-angular-25", help="packaged job to vary (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("runs/strategies"))
    parser.add_argument("--strategies", nargs="+", default=["angular", "simple", "random"])
    parser.add_argument("--random-seed", type=int, default=1, help="which block `random` draws (reported)")
    parser.add_argument("--steps", type=int, help="override the job's healing steps")
    args = parser.parse_args()
    base = yaml.safe_load(packaged_jobs()[args.job].read_text())
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for strategy in args.strategies:
        job = {**base, "name": f"{base['name']}-{strategy}",
               "prune": {**base["prune"], "strategy": strategy, "seed": args.random_seed}}
        if args.steps:
            job["heal"] = {**job["heal"], "steps": args.steps}
        path = args.out / f"{job['name']}.yaml"
        path.write_text(f"# {__doc__.splitlines()[0]}\n" + yaml.safe_dump(job, sort_keys=False))
        out = args.out / job["name"]
        manifest = JobManifest.load(out / "manifest.json") if (out / "manifest.json").is_file() else run_job(path, out)
        ppl = {row["label"]: row["held_out_perplexity"] for row in manifest.metrics.evaluation}
        rows.append((strategy, manifest.removed, manifest.distance, ppl, manifest.stage_seconds["heal"]))

    print(f"\n{args.job}, healing as in the job{f' but {args.steps} steps' if args.steps else ''}; held-out "
          f"perplexity (original {rows[0][3]['original']:.2f})")
    print("| strategy | block | angular d | pruned | healed | gap recovered | heal s |")
    print("|---|---|---|---|---|---|---|")
    for strategy, (start, end), d, ppl, seconds in rows:
        recovered = gap_recovered(ppl["original"], ppl["pruned"], ppl["healed"])
        before, after = ppl["pruned"], ppl["healed"]
        print(f"| {strategy} | [{start}, {end}) | {d:.4f} | {before:.2f} ({before / ppl['original']:.2f}x) | "
              f"{after:.2f} ({after / ppl['original']:.2f}x) | {recovered:.0%} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
