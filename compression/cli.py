"""`prunefusion compress measure | prune | heal | evaluate`.

    prunefusion compress measure --model DIR --out runs/measure [--data FILES...] [--samples 128 --seq-len 256]
    prunefusion compress prune --model DIR --out DIR --fraction 0.25 [--strategy angular] [--distances FILE]
    prunefusion compress prune --model DIR --out DIR --layers 4:6        # 0-based, half-open
    prunefusion compress prune --model DIR --out DIR --layers 6:8 --allow-last --force
    prunefusion compress heal --model PRUNED --out runs/heal [--steps 200 --lr 3e-4 --rank 8]
    prunefusion compress evaluate ORIGINAL PRUNED runs/heal/merged [--task mc.jsonl] [--out runs/eval]
    prunefusion compress run compression/jobs/tiny-lm-angular-25.yaml --out runs/tiny-lm-angular-25
    prunefusion compress run JOB.yaml --out DIR --stop-after measure     # look at the distances, rerun to go on
    prunefusion compress export-onnx --model DIR --out DIR [--opset 18] [--atol 1e-4] [--force]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from prunefusion.lazy import resolve
from prunefusion.model_kinds import checkpoint_kind, load_model


def _measure(args: argparse.Namespace) -> int:
    from prunefusion.compression.report import run_measure

    table = run_measure(Path(args.model), Path(args.out), args.data, args.samples, args.seq_len, args.batch_size)
    print(f"{table.samples} samples, {table.num_layers} layers -> {args.out}/distances.json, distances.csv, "
          "distance_heatmap.png, best_blocks.png")
    for n in range(1, table.num_layers - 1):
        start, d = table.best(n)
        print(f"  n={n:2d}: drop [{start}, {start + n})  d={d:.4f}")
    return 0


def _prune(args: argparse.Namespace) -> int:
    from prunefusion.checkpoints import weights_digest
    from prunefusion.compression.layers import find_layers
    from prunefusion.compression.measure import DistanceTable
    from prunefusion.compression.prune import choose_block, write_pruned
    from prunefusion.compression.report import run_measure
    from prunefusion.compression.strategies import NEEDS_TABLE

    model_dir, out = Path(args.model), Path(args.out)
    if out.exists() and not args.force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    model, tokenizer = load_model(model_dir)
    total = len(find_layers(model)[1])
    table = None
    if not args.layers and args.strategy in NEEDS_TABLE:
        table = (DistanceTable.from_json(json.loads(Path(args.distances).read_text())) if args.distances
                 else run_measure(model_dir, out.with_name(out.name + ".measure"), args.data, args.samples,
                                  args.seq_len, args.batch_size))
    block = choose_block(total, strategy=args.strategy, n=args.n, fraction=args.fraction, layers=args.layers,
                         table=table, seed=args.seed)
    write_pruned(model, tokenizer, block, out, source=model_dir, source_digest=weights_digest(model_dir),
                 allow_last=args.allow_last)
    print(f"pruned {model_dir} -> {out}: removed layers [{block.start}, {block.end}) ({block.strategy}), {total} -> "
          f"{total - (block.end - block.start)} layers; reload verified")
    return 0


def _heal(args: argparse.Namespace) -> int:
    """The model's kind heals it: causal LMs by QLoRA on next-token loss (heal.py), encoders by distillation toward
    --teacher (distill.py)."""
    given = dict(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, learning_rate=args.lr)
    options = dict({k: v for k, v in given.items() if v is not None}, warmup_steps=args.warmup, rank=args.rank,
                   checkpoint_every=args.checkpoint_every, device=args.device,
                   targets=tuple(args.targets) if args.targets else None)
    if args.quantize is not None:
        options["quantize"] = args.quantize
    if args.full_finetune:  # unquantized unless --quantize was asked for too (which HealConfig then refuses)
        options["full_finetune"] = True
        options.setdefault("quantize", False)
    model, out = Path(args.model), Path(args.out)
    kind = checkpoint_kind(model)
    if args.teacher and not kind.heals_toward_original:
        raise ValueError(f"--teacher is for encoders; a {kind.name} model heals by {kind.heal_method}")
    if kind.heals_toward_original and not args.teacher:
        raise ValueError(f"{model} is an {kind.name}: it heals by {kind.heal_method}; pass --teacher DIR (the "
                         "unpruned model)")
    summary = resolve(kind.heal)(model, Path(args.teacher) if args.teacher else None, out,
                                 kind.texts(args.data, "train"), resolve(kind.heal_config)(**options),
                                 args.stop_after_steps)
    losses = summary["losses"]
    resumed = f", resumed from step {summary['resumed_from']}" if summary["resumed_from"] else ""
    if "merge" not in summary:
        print(f"stopped after {summary['steps_run']} steps this run (step {summary['step']}{resumed}); rerun the same "
              f"command to go on from the last checkpoint in {args.out}/checkpoints")
        return 0
    merged = ("every weight trained, nothing to merge" if summary["merge"].get("full_finetune") else
              f"merged vs adapter {kind.merge_check.replace('_', ' ')} {summary['merge'][kind.merge_check]:.1e}")
    print(f"{kind.healed} {args.model} -> {args.out}/merged by {kind.heal_method} ({summary['steps_run']} steps "
          f"this run{resumed}); loss {losses[0]:.3f} -> {losses[-1]:.3f}; {merged}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from prunefusion.compression.evaluate import load_task, rows_table

    kind = checkpoint_kind(Path(args.models[0]))
    task = load_task(Path(args.task)) if args.task else None
    rows = resolve(kind.evaluate)([Path(m) for m in args.models], kind.texts(args.data, "held_out"), task)
    rows = [{"label": row.pop("model"), **row} for row in rows]
    table = rows_table(rows)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "evaluation.md").write_text(table + "\n")
        (out / "evaluation.json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0


def _run(args: argparse.Namespace) -> int:
    from prunefusion.compression.job import run_job

    manifest = run_job(Path(args.job), Path(args.out), device=args.device, restart=args.restart, force=args.force,
                       keep_intermediate=args.keep_intermediate, stop_after=args.stop_after)
    if manifest is None:
        print(f"stopped after stage {args.stop_after}: the work so far is in {args.out}.partial; rerun without "
              "--stop-after to finish the job")
        return 0
    start, end = manifest.removed
    summary = ", ".join(f"{row['label']} {row['held_out_perplexity']:.2f}" for row in manifest.metrics.evaluation
                        if row.get("held_out_perplexity") is not None)
    print(f"{manifest.name}: removed [{start}, {end}) ({manifest.strategy}) -> {args.out} "
          f"(report.md, manifest.json){'; held-out perplexity ' + summary if summary else ''}")
    return 0


def register(subparsers) -> None:
    from prunefusion.compression.job import STAGES
    from prunefusion.compression.onnx_export import add_export_parser
    from prunefusion.compression.strategies import STRATEGIES

    compress = subparsers.add_parser("compress", help="layer pruning by angular distance",
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = compress.add_subparsers(dest="compress_command", required=True)

    def calibration(p):
        p.add_argument("--data", nargs="*", default=[], help="text / .jsonl files or datasets dirs "
                       "(default: the stdlib corpus)")
        p.add_argument("--samples", type=int, default=128)
        p.add_argument("--seq-len", type=int, default=256)
        p.add_argument("--batch-size", type=int, default=8)

    m = sub.add_parser("measure", help="angular distance table d(l, n) from one pass over calibration text")
    m.add_argument("--model", required=True)
    m.add_argument("--out", required=True)
    calibration(m)
    m.set_defaults(func=_measure)

    p = sub.add_parser("prune", help="remove a block of layers and write an HF checkpoint")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--n", type=int, help="number of layers to remove")
    size.add_argument("--fraction", type=float, help="fraction of layers to remove")
    size.add_argument("--layers", help="explicit 0-based half-open block START:END")
    p.add_argument("--strategy", default="angular", choices=sorted(STRATEGIES))
    p.add_argument("--distances", help="distances.json from `compress measure` (else measured now)")
    p.add_argument("--seed", type=int, default=0, help="for --strategy random")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--allow-last", action="store_true", help="allow a block that contains the final layer (almost "
                   "always the worst choice: its input and output are nearly maximally dissimilar)")
    calibration(p)
    p.set_defaults(func=_prune)

    h = sub.add_parser("heal", help="QLoRA-heal a pruned model (an encoder: by distillation toward --teacher), "
                       "merge into a plain checkpoint (OUT/merged)")
    h.add_argument("--model", required=True, help="the pruned model directory")
    h.add_argument("--teacher", help="the unpruned model; required for encoders (BERT/MiniLM), which heal by "
                   "distilling its mean-pooled sentence embeddings")
    h.add_argument("--out", required=True, help="checkpoints/, adapter/, merged/, heal_loss.png; reruns resume")
    h.add_argument("--data", nargs="*", default=[], help="training text (default: the stdlib corpus)")
    h.add_argument("--steps", type=int, help="default: 200 (causal LM), 300 (encoder)")
    h.add_argument("--batch-size", type=int, help="default: 8 sequences (causal LM), 32 sentences (encoder)")
    h.add_argument("--seq-len", type=int, help="default: 256 (causal LM), 128 (encoder, truncation)")
    h.add_argument("--lr", type=float, help="default: 3e-4 (causal LM), 3e-3 (encoder)")
    h.add_argument("--warmup", type=int, default=20)
    h.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = rank)")
    h.add_argument("--targets", nargs="*", help="module names for LoRA (default: the family's FFN projections)")
    h.add_argument("--quantize", action=argparse.BooleanOptionalAction, help="NF4 base (QLoRA), or plain LoRA "
                   "on the unquantized base (--no-quantize); default: QLoRA for causal LMs, plain LoRA for encoders")
    h.add_argument("--full-finetune", action="store_true", help="train every weight of the unquantized model "
                   "instead of a LoRA adapter (no merge; implies --no-quantize): more capacity, for small models")
    h.add_argument("--checkpoint-every", type=int, default=50)
    h.add_argument("--device", default="cpu", help="cpu (float32 compute) or cuda (bfloat16 compute)")
    h.add_argument("--stop-after-steps", type=int, metavar="N", help="train at most N steps in this run, then stop "
                   "(checkpoints stay; the same command resumes): for machines lent in time slices")
    h.set_defaults(func=_heal)

    e = sub.add_parser("evaluate", help="perplexity, MC accuracy, decode speed, size: one table, first = baseline")
    e.add_argument("models", nargs="+", help="model directories (e.g. original pruned healed/merged)")
    e.add_argument("--data", nargs="*", default=[], help="held-out text (default: the stdlib corpus held-out split)")
    e.add_argument("--task", help='multiple-choice JSONL: {"context", "choices", "answer"} per line')
    e.add_argument("--out", help="also write evaluation.md and evaluation.json here")
    e.set_defaults(func=_evaluate)

    r = sub.add_parser("run", help="the whole job from one YAML: measure, prune, heal, merge, evaluate, report",
                       description="Runs JOB.yaml (what to build; examples in compression/jobs/) into --out. Work "
                       "goes to OUT.partial; a rerun resumes it; OUT appears only when the job has finished.")
    r.add_argument("job", help="the job YAML")
    r.add_argument("--out", required=True, help="the finished job: an HF checkpoint + manifest.json + report.md")
    r.add_argument("--device", default="cpu", help="cpu (float32 compute) or cuda (bfloat16 compute)")
    r.add_argument("--restart", action="store_true", help="discard an unfinished OUT.partial instead of resuming")
    r.add_argument("--force", action="store_true", help="run again over a finished OUT (replaced at the end)")
    r.add_argument("--keep-intermediate", action="store_true",
                   help="keep the pruned weights before healing and the healing checkpoints")
    r.add_argument("--stop-after", choices=list(STAGES), help="stop after this stage (the work stays in OUT.partial; "
                   "rerunning without it goes on), e.g. measure, to look at the distance table first")
    r.set_defaults(func=_run)
    add_export_parser(sub)
