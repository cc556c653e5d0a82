"""Healing that generalises: all-MiniLM-L6-v2 with 2 of 6 layers removed, healed by distillation on stdlib prose
only (the shipped job before) vs on several local text sources through the quality filter; mean cosine to the
original's embeddings in domain (held-out stdlib sentences) and out of domain (sources no variant heals on).

Each variant is compression/jobs/minilm-2of6.yaml (the product path, `run_job`) with its `heal.data` / `heal.filter`
replaced (broad-full: by minilm-2of6-broad.yaml's healing data and settings: every weight trained, the layer-wise
term); every variant is evaluated on the same two sets:
- in domain: the stdlib corpus' held-out prose sentences (none occurs in a training document);
- out of domain: `local:licenses`, `local:package-readmes`, `local:debian-changelogs` (prunefusion/local_texts.py):
  licence texts, Python package readmes, Debian changelogs. No variant heals on these source types, and their
  sentences that occur in any variant's healing text (a licence quoted in a man page) are dropped from the set.

    .venv/bin/python benchmarks/minilm_heal_sources.py [--variants stdlib broad] [--steps 1000] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml

from prunefusion.compression.job import run_job
from prunefusion.compression.records import JobManifest
from prunefusion.models.builds import job_file
from prunefusion.texts import load_texts

OUT_OF_DOMAIN = ["local:licenses", "local:package-readmes", "local:debian-changelogs"]
BROAD_JOB = yaml.safe_load(job_file("minilm-2of6-broad").read_text())["heal"]
BROAD = BROAD_JOB["data"]  # stdlib, man pages, info manuals, Debian descriptions
BROAD_FILTER = BROAD_JOB["filter"]  # Sharma score, keep 0.8
VARIANTS = {  # name -> heal.data, heal.filter, other heal overrides (of minilm-2of6.yaml: LoRA rank 32, lr 3e-3)
    "stdlib": ([], None, {}),
    "broad": (BROAD, BROAD_FILTER, {}),
    "broad-2000": (BROAD, BROAD_FILTER, {"steps": 2000}),  # twice the job's steps: about one pass over the kept text
    # + the layer-wise term, 10000 steps, still LoRA (minilm-2of6-broad.yaml before it trained every weight)
    "broad-layer-wise": (BROAD, BROAD_FILTER, {"steps": 10000, "layer_weight": 4.0, "checkpoint_every": 500}),
    # compression/jobs/minilm-2of6-broad.yaml: the same data and term, every weight trained, lr 3e-4, 6000 steps
    "broad-full": (BROAD, BROAD_FILTER, {k: BROAD_JOB[k] for k in ("full_finetune", "steps", "learning_rate",
                                                                   "layer_weight", "checkpoint_every")}),
}
VARIANTS["broad-full-seed1"] = (BROAD, BROAD_FILTER, {**VARIANTS["broad-full"][2], "seed": 1})  # another batch order


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=None, help="override the job's healing steps")
    parser.add_argument("--out", type=Path, default=Path("runs/minilm_heal_sources"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load(job_file("minilm-2of6").read_text())
    base.pop("loadtest", None)
    healing = {t for data, _, _ in VARIANTS.values() for t in load_texts(data or ["local:stdlib"], "sentences")}
    every = load_texts(OUT_OF_DOMAIN, "sentences")
    ood = [t for t in every if t not in healing]  # a licence sentence quoted in a man page is not out of domain
    ood_file = args.out / "out_of_domain.jsonl"
    ood_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in ood))
    print(f"out-of-domain set: {len(ood)} sentences from {OUT_OF_DOMAIN} ({len(every) - len(ood)} dropped: they "
          "occur in some variant's healing text)", flush=True)
    results = []
    for name in args.variants:
        data, spec, overrides = VARIANTS[name]
        job = {**base, "name": f"minilm-2of6-{name}",
               "heal": {**base["heal"], "data": data, **({"filter": spec} if spec else {}), **overrides,
                        **({"steps": args.steps} if args.steps else {})},
               "evaluate": {"sets": {"out_of_domain": [str(ood_file)]}}}
        path = args.out / f"{name}.yaml"
        path.write_text(yaml.safe_dump(job, sort_keys=False))
        out = args.out / name
        started = time.time()
        if not (out / "manifest.json").is_file():
            run_job(path, out)
        m = JobManifest.load(out / "manifest.json")
        heal_texts = load_texts(data, "sentences") if data else load_texts(["local:stdlib"], "sentences")
        if m.data_filter is not None and m.data_filter.heal is not None:
            heal_texts = [json.loads(line)["text"] for line in (out / m.data_filter.heal.file).read_text().splitlines()]
        rows = {"in_domain": {r["label"]: r for r in m.metrics.evaluation},
                "out_of_domain": {r["label"]: r for r in m.metrics.sets["out_of_domain"]}}
        results.append({"variant": name, "heal_data": data or ["stdlib sentences (default)"], "filter": spec,
                        "heal_sentences": len(heal_texts), "leaked": len(set(ood) & set(heal_texts)),
                        "heal_seconds": m.stage_seconds.get("heal"), "seconds": time.time() - started,
                        "rows": rows})
        print(f"[{name}] in domain {rows['in_domain']['healed']['mean_cosine']:.4f}, out of domain "
              f"{rows['out_of_domain']['healed']['mean_cosine']:.4f}", flush=True)

    lines = ["| variant | healing sentences | OOD sentences also in healing | pruned, in / out of domain | "
             "healed in domain: mean / p5 / min | healed out of domain: mean / p5 / min | heal s |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        def cells(row: dict) -> str:
            return f"{row['mean_cosine']:.4f} / {row['cosine_p5']:.3f} / {row['cosine_min']:.3f}"

        i, o = r["rows"]["in_domain"], r["rows"]["out_of_domain"]
        lines.append(f"| {r['variant']}: {', '.join(r['heal_data'])} | {r['heal_sentences']:,} | {r['leaked']} | "
                     f"{i['pruned']['mean_cosine']:.4f} / {o['pruned']['mean_cosine']:.4f} | {cells(i['healed'])} | "
                     f"{cells(o['healed'])} | {r['heal_seconds']:.0f} |")
    table = "\n".join(lines)
    print("\n" + table)
    (args.out / "minilm_heal_sources.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "minilm_heal_sources.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
