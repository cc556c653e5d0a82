"""`prunefusion score ...`: text quality scoring from the shell.

    prunefusion score data/*.jsonl --out kept.jsonl --rejected rejected.jsonl --report runs/score
    prunefusion score docs/*.txt --out kept.jsonl --methods sharma --drop-bottom-percent 40
    prunefusion score calibrate --reference-model DIR --data corpus.jsonl --out weights.json
    prunefusion score calibrate --reference-model DIR --mixed-corpus 2000 --out weights.json   # the shipped defaults
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def calibrate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prunefusion score calibrate",
                                description="Sharma filter weights from a reference LM: "
                                            "w_i = max(0, (PPL_all - PPL_i) / PPL_all)")
    p.add_argument("--reference-model", type=Path, required=True, help="a causal LM directory (HF format)")
    p.add_argument("--data", nargs="*", default=[], help="JSONL ('text' field) or plain-text files")
    p.add_argument("--mixed-corpus", type=int, metavar="N",
                   help="instead of --data: the project's seeded mix of N clean and junk documents")
    p.add_argument("--max-lines", type=int, default=20000, help="a seeded sample of this many lines (default 20000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, required=True)
    return p


def _calibrate(argv: list[str]) -> int:
    from prunefusion.compression.loading import load_texts
    from prunefusion.quality.calibrate import calibrate
    from prunefusion.quality.mixed_corpus import mixed_corpus

    args = calibrate_parser().parse_args(argv)
    if bool(args.data) == bool(args.mixed_corpus):
        print("error: give --data FILES or --mixed-corpus N (one of them)", file=sys.stderr)
        return 2
    if args.mixed_corpus:
        texts = [d.text for d in mixed_corpus(args.mixed_corpus, seed=args.seed)]
        description = f"prunefusion.quality.mixed_corpus(n_documents={args.mixed_corpus}, seed={args.seed})"
    else:
        texts, description = load_texts(args.data), ", ".join(args.data)
    try:
        weights = calibrate(args.reference_model, texts, max_lines=args.max_lines, seed=args.seed,
                            data_description=description, device=args.device)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    weights.save(args.out)
    p = weights.provenance
    print(f"PPL_all {p['ppl_all']:.2f} over {p['lines']} lines; wrote {args.out}")
    for name, f in p["filters"].items():
        print(f"  {name:<24} weight {f['weight']:.4f}  PPL_i {f['ppl']:9.2f}  lines passing {f['lines_passing']}")
    return 0


def _score(args: argparse.Namespace) -> int:
    if args.rest and args.rest[0] == "calibrate":
        return _calibrate(args.rest[1:])
    from prunefusion.quality.batch import main as batch_main

    return batch_main(args.rest)


def register(sub) -> None:
    p = sub.add_parser("score", help="score files for text quality (keep/reject with reasons), or calibrate the "
                       "Sharma weights (`score calibrate`)", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_score)
