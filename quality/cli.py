"""`prunefusion score ...`: text quality scoring from the shell.

    prunefusion score data/*.jsonl --out kept.jsonl --rejected rejected.jsonl --report runs/score
    prunefusion score docs/*.txt --out kept.jsonl --methods sharma --drop-bottom-percent 40
    prunefusion score corpus.parquet hf_dataset_dir --out kept.jsonl --executor ray --workers 8
    prunefusion score data/*.jsonl --work /shared/w --shard 3/16          # one of 16 array tasks, then:
    prunefusion score merge --work /shared/w --out kept.jsonl --rejected rejected.jsonl
    prunefusion score calibrate --reference-model DIR --data corpus.jsonl --out weights.json
    prunefusion score calibrate --reference-model DIR --mixed-corpus 2000 --out weights.json   # the shipped defaults

`prunefusion score FILES...` is short for `prunefusion score files FILES...`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_SUBCOMMAND = "files"  # `score FILES...` runs `score files FILES...` (prunefusion.cli.DEFAULT_SUBCOMMANDS)


def _calibrate(args: argparse.Namespace) -> int:
    from prunefusion.quality.calibrate import calibrate
    from prunefusion.quality.mixed_corpus import mixed_corpus
    from prunefusion.texts import load_texts

    if bool(args.data) == bool(args.mixed_corpus):
        raise ValueError("give --data FILES or --mixed-corpus N (one of them)")
    if args.mixed_corpus:
        texts = [d.text for d in mixed_corpus(args.mixed_corpus, seed=args.seed)]
        description = f"prunefusion.quality.mixed_corpus(n_documents={args.mixed_corpus}, seed={args.seed})"
    else:
        texts, description = load_texts(args.data), ", ".join(args.data)
    weights = calibrate(args.reference_model, texts, max_lines=args.max_lines, seed=args.seed,
                        data_description=description, device=args.device)
    weights.save(args.out)
    p = weights.provenance
    print(f"PPL_all {p['ppl_all']:.2f} over {p['lines']} lines; wrote {args.out}")
    for name, f in p["filters"].items():
        print(f"  {name:<24} weight {f['weight']:.4f}  PPL_i {f['ppl']:9.2f}  lines passing {f['lines_passing']}")
    return 0


def _score(args: argparse.Namespace) -> int:
    from prunefusion.quality.batch import run

    return run(args)


def _merge(args: argparse.Namespace) -> int:
    from prunefusion.quality.batch import run_merge

    return run_merge(args)


def register(sub) -> None:
    from prunefusion.quality.batch import __doc__ as batch_doc
    from prunefusion.quality.batch import add_arguments, add_merge_arguments

    score = sub.add_parser("score", help="score files for text quality (keep/reject with reasons), or calibrate the "
                           "Sharma weights (`score calibrate`)", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    ssub = score.add_subparsers(dest="score_command", required=True)
    files = ssub.add_parser("files", help="score JSONL, Parquet, `datasets` folders and text files; write kept and "
                            "rejected documents and a report (the default: `score FILES...`)", description=batch_doc,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(files)
    files.set_defaults(func=_score)
    m = ssub.add_parser("merge", help="write the kept and rejected files from a work folder that `score --shard` "
                        "runs filled (every shard must have finished)")
    add_merge_arguments(m)
    m.set_defaults(func=_merge)
    c = ssub.add_parser("calibrate", help="Sharma filter weights from a reference LM: "
                        "w_i = max(0, (PPL_all - PPL_i) / PPL_all)")
    c.add_argument("--reference-model", type=Path, required=True, help="a causal LM directory (HF format)")
    c.add_argument("--data", nargs="*", default=[], help="JSONL ('text' field) or plain-text files")
    c.add_argument("--mixed-corpus", type=int, metavar="N",
                   help="instead of --data: the project's seeded mix of N clean and junk documents")
    c.add_argument("--max-lines", type=int, default=20000, help="a seeded sample of this many lines (default 20000)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--device", default="cpu")
    c.add_argument("--out", type=Path, required=True)
    c.set_defaults(func=_calibrate)
