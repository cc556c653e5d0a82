"""Does healing on filtered data help? Heal the default pruned LM on (A) a junk-mixed corpus filtered by the job's
own `heal.filter` to the top 60%, (B) a seeded random 60% of it, (C) all of it; equal steps, several seeds.

Each arm is a real compression job (`compression.job.run_job`, the product path): the default LM (`tiny-lm`, built
when missing), the default job's calibration and angular 25% block, and its healing settings, with `heal.data`
pointing at the arm's documents. A's job carries the filter section

    filter: {methods: [sharma, gopher_repetition], keep_fraction: 0.6}

(the Sharma score plus the repetition rule: the default rule set also runs Gopher's alphabetic-word rule, which
rejects most code-heavy stdlib prose). The seed is the healing seed (LoRA init, batch order) and B's sample.

Training corpus: `mixed_corpus(3000, junk_fraction=0.4, seed=0)` (clean paragraphs of the stdlib corpus' TRAIN-split
prose + boilerplate, repeated lines, code dumps, lists, lorem ipsum). One tokenizer for all (the pruned model's),
so perplexities compare directly. Two evaluation sets, neither seen in healing:
- in-domain: held-out clean stdlib prose (sentences found in no training document; quality_pruning_experiment.py's
  `evaluation_documents`);
- out-of-domain: the long descriptions (readmes) of the installed Python packages (`importlib.metadata`), text from
  sources neither the model's training nor any arm's healing saw.

Reported: perplexity of original, pruned, and each healed arm, and the share of the pruning gap each arm recovers,
(pruned - healed) / (pruned - original), per seed, with mean and spread.

    .venv/bin/python benchmarks/heal_data_filter.py [--documents 3000] [--steps 400] [--seeds 0 1 2]
        [--selections A B C] [--out benchmarks/results/heal_data_filter]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_pruning_experiment import evaluation_documents  # noqa: E402

from prunefusion.compression.evaluate import evaluate_causal_lms  # noqa: E402
from prunefusion.compression.job import run_job  # noqa: E402
from prunefusion.compression.records import JobManifest  # noqa: E402
from prunefusion.models.builds import job_file  # noqa: E402
from prunefusion.quality.mixed_corpus import mixed_corpus  # noqa: E402

SELECTIONS = {"A": "filtered: top 60% (sharma + gopher_repetition)", "B": "random 60%", "C": "all documents"}
A_FILTER = {"methods": ["sharma", "gopher_repetition"], "keep_fraction": 0.6}


def package_readmes(limit: int = 80, max_chars: int = 3000) -> list[str]:
    """Long descriptions of installed distributions (sorted by name, duplicates dropped): out-of-domain text."""
    seen, texts = set(), []
    for dist in sorted(metadata.distributions(), key=lambda d: (d.metadata["Name"] or "").lower()):
        body = (dist.metadata.get_payload() or "").strip()
        if len(body) < 500 or body in seen:
            continue
        seen.add(body)
        texts.append(body[:max_chars])
        if len(texts) == limit:
            break
    return texts


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def arm_job(base: dict, name: str, data: Path, seed: int, steps: int, held_out: Path) -> dict:
    job = json.loads(json.dumps(base))
    job["name"] = name
    job["heal"].update(data=[str(data)], steps=steps, seed=seed)
    job["evaluate"] = {"data": [str(held_out)]}
    return job


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=3000)
    parser.add_argument("--junk-fraction", type=float, default=0.4)
    parser.add_argument("--keep", type=float, default=0.6)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--selections", nargs="+", default=list(SELECTIONS), choices=list(SELECTIONS))
    parser.add_argument("--out", type=Path, default=Path("runs/heal_data_filter"))
    args = parser.parse_args()
    started = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load(job_file("tiny-lm-angular-25").read_text())

    corpus = mixed_corpus(n_documents=args.documents, junk_fraction=args.junk_fraction, seed=0)
    held_docs, held_info = evaluation_documents(corpus, 1)
    ood_docs = package_readmes()
    corpus_file = write_jsonl(args.out / "corpus.jsonl", [d.text for d in corpus])
    held_file = write_jsonl(args.out / "held_out.jsonl", held_docs)
    print(f"corpus {len(corpus)} documents ({sum(d.kind != 'clean' for d in corpus)} junk); in-domain held-out "
          f"{held_info['documents']} documents, {held_info['characters']:,} chars; out-of-domain: "
          f"{len(ood_docs)} package readmes, {sum(map(len, ood_docs)):,} chars", flush=True)

    runs, reference = [], None
    for seed in args.seeds:
        for selection in args.selections:
            name = f"{selection}-seed{seed}"
            out = args.out / name
            if selection == "B":
                k = round(args.keep * len(corpus))
                data = write_jsonl(args.out / f"random-{seed}.jsonl",
                                   [corpus[i].text for i in sorted(random.Random(seed).sample(range(len(corpus)), k))])
            else:
                data = corpus_file
            job = arm_job(base, name, data, seed, args.steps, held_file)
            if selection == "A":
                job["heal"]["filter"] = A_FILTER
            job_path = args.out / f"{name}.yaml"
            job_path.write_text(yaml.safe_dump(job, sort_keys=False))
            t0 = time.time()
            if not (out / "manifest.json").is_file():
                run_job(job_path, out, keep_intermediate=reference is None)
            manifest = JobManifest.load(out / "manifest.json")
            rows = {r["label"]: r for r in manifest.metrics.evaluation}
            if reference is None:  # original and pruned do not depend on the arm: evaluate them out of domain once
                ood = evaluate_causal_lms([manifest.source.path, out / "pruned"], ood_docs)
                reference = {"original": rows["original"]["held_out_perplexity"],
                             "pruned": rows["pruned"]["held_out_perplexity"],
                             "original_ood": ood[0]["held_out_perplexity"], "pruned_ood": ood[1]["held_out_perplexity"],
                             "removed": manifest.removed}
            healed_ood = evaluate_causal_lms([out], ood_docs)[0]["held_out_perplexity"]
            filtered = manifest.data_filter.heal if manifest.data_filter else None
            junk = None
            if filtered is not None:
                kept = {json.loads(line)["text"] for line in (out / filtered.file).read_text().splitlines()}
                junk = sum(d.kind != "clean" and d.text in kept for d in corpus)
            elif selection == "B":
                kept_texts = {json.loads(line)["text"] for line in data.read_text().splitlines()}
                junk = sum(d.kind != "clean" and d.text in kept_texts for d in corpus)
            else:
                junk = sum(d.kind != "clean" for d in corpus)
            run = {"selection": selection, "seed": seed, "healed": rows["healed"]["held_out_perplexity"],
                   "healed_ood": healed_ood, "final_loss": manifest.healing.final_loss,
                   "documents": filtered.kept if filtered else (len(corpus) if selection == "C" else k),
                   "junk_documents": junk, "heal_seconds": manifest.stage_seconds.get("heal"),
                   "filter_reasons": filtered.reason_counts if filtered else None, "seconds": time.time() - t0}
            runs.append(run)
            print(f"[{name}] healed ppl {run['healed']:.2f} (ood {healed_ood:.1f}); {run['documents']} docs, "
                  f"{junk} junk; {run['seconds']:.0f} s", flush=True)

    def gap(pruned: float, original: float, healed: float) -> float:
        return (pruned - healed) / (pruned - original)

    ref = reference
    lines = [f"Pruned: layers {ref['removed']} removed from tiny-lm (8 layers). In-domain perplexity original "
             f"{ref['original']:.2f}, pruned {ref['pruned']:.2f}; out-of-domain original {ref['original_ood']:.1f}, "
             f"pruned {ref['pruned_ood']:.1f}. {args.steps} healing steps per arm.", "",
             "| arm | seed | docs (junk) | held-out ppl | gap recovered | out-of-domain ppl | OOD gap recovered | "
             "final train loss |", "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['selection']}: {SELECTIONS[r['selection']]} | {r['seed']} | {r['documents']} "
                     f"({r['junk_documents']}) | {r['healed']:.2f} | "
                     f"{gap(ref['pruned'], ref['original'], r['healed']):.1%} | "
                     f"{r['healed_ood']:.1f} | {gap(ref['pruned_ood'], ref['original_ood'], r['healed_ood']):.1%} | "
                     f"{r['final_loss']:.3f} |")
    lines += ["", "| arm | held-out ppl, mean (min-max) | gap recovered, mean | OOD ppl, mean (min-max) |",
              "|---|---|---|---|"]
    for selection in args.selections:
        mine = [r for r in runs if r["selection"] == selection]
        ppl, ood = [r["healed"] for r in mine], [r["healed_ood"] for r in mine]
        lines.append(f"| {selection} | {statistics.mean(ppl):.2f} ({min(ppl):.2f}-{max(ppl):.2f}) | "
                     f"{gap(ref['pruned'], ref['original'], statistics.mean(ppl)):.1%} | "
                     f"{statistics.mean(ood):.1f} ({min(ood):.1f}-{max(ood):.1f}) |")
    for a, b in (("A", "B"), ("A", "C")):
        ratios = [ra["healed"] / rb["healed"] for ra in runs for rb in runs
                  if ra["selection"] == a and rb["selection"] == b and ra["seed"] == rb["seed"]]
        if ratios:
            lines.append(f"\n{a}/{b} held-out perplexity per seed: " + ", ".join(f"{x:.4f}" for x in ratios))
    table = "\n".join(lines)
    print("\n" + table + f"\n\ntotal {time.time() - started:.0f} s")
    (args.out / "heal_data_filter.json").write_text(json.dumps({"reference": ref, "runs": runs,
                                                                "held_out": held_info, "settings": {
                                                                    k: str(v) for k, v in vars(args).items()}},
                                                               indent=1) + "\n")
    (args.out / "heal_data_filter.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
