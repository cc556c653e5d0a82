"""`prunefusion compress measure | prune | heal | evaluate`.

    prunefusion compress measure --model DIR --out runs/measure [--data FILES...] [--samples 128 --seq-len 256]
    prunefusion compress prune --model DIR --out DIR --fraction 0.25 [--strategy angular] [--distances FILE]
    prunefusion compress prune --model DIR --out DIR --layers 4:6        # 0-based, half-open
    prunefusion compress heal --model PRUNED --out runs/heal [--steps 200 --lr 3e-4 --rank 8]
    prunefusion compress evaluate ORIGINAL PRUNED runs/heal/merged [--task mc.jsonl] [--out runs/eval]
    prunefusion compress run compression/jobs/tiny-lm-angular-25.yaml --out runs/tiny-lm-angular-25
    prunefusion compress export-onnx --model DIR --out DIR [--opset 18] [--atol 1e-4] [--force]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from prunefusion.compression.loading import is_causal_checkpoint, load_model, texts_or_default


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
    from prunefusion.checkpoints import digest_files, weight_files
    from prunefusion.compression.layers import find_layers
    from prunefusion.compression.measure import DistanceTable
    from prunefusion.compression.prune import choose_block, write_pruned
    from prunefusion.compression.report import run_measure
    from prunefusion.compression.strategies import NEEDS_TABLE

    model_dir, out = Path(args.model), Path(args.out)
    if out.exists() and not args.force:
        print(f"error: {out} exists; pass --force to replace it", file=sys.stderr)
        return 1
    model, tokenizer = load_model(model_dir)
    total = len(find_layers(model)[1])
    table = None
    if not args.layers and args.strategy in NEEDS_TABLE:
        table = (DistanceTable.from_json(json.loads(Path(args.distances).read_text())) if args.distances
                 else run_measure(model_dir, out.with_name(out.name + ".measure"), args.data, args.samples,
                                  args.seq_len, args.batch_size))
    block = choose_block(total, strategy=args.strategy, n=args.n, fraction=args.fraction, layers=args.layers,
                         table=table, seed=args.seed)
    write_pruned(model, tokenizer, block, out, source=model_dir, source_digest=digest_files(weight_files(model_dir)),
                 allow_last=args.force)
    print(f"pruned {model_dir} -> {out}: removed layers [{block.start}, {block.end}) ({block.strategy}), {total} -> "
          f"{total - (block.end - block.start)} layers; reload verified")
    return 0


def _heal(args: argparse.Namespace) -> int:
    """Causal LMs: QLoRA on next-token loss (heal.py). Encoders: distillation toward --teacher (distill.py)."""
    from prunefusion.compression.heal import HealConfig, heal

    given = dict(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, learning_rate=args.lr)
    options = dict({k: v for k, v in given.items() if v is not None}, warmup_steps=args.warmup, rank=args.rank,
                   checkpoint_every=args.checkpoint_every, device=args.device,
                   targets=tuple(args.targets) if args.targets else None)
    if args.quantize is not None:
        options["quantize"] = args.quantize
    model, out = Path(args.model), Path(args.out)
    causal = is_causal_checkpoint(model)
    texts = texts_or_default(args.data, causal, "train")
    if causal:
        if args.teacher:
            raise ValueError("--teacher is for encoders; a causal LM heals on next-token loss")
        summary, verb, key = heal(model, out, texts, HealConfig(**options)), "healed", "max_logit_difference"
    else:
        from prunefusion.compression.distill import DistillConfig, distill

        if not args.teacher:
            raise ValueError(f"{model} is an encoder: it heals by distillation toward the unpruned model; "
                             "pass --teacher DIR")
        summary = distill(model, Path(args.teacher), out, texts, DistillConfig(**options))
        verb, key = "distilled", "max_hidden_difference"
    losses = summary["losses"]
    print(f"{verb} {args.model} -> {args.out}/merged ({summary['steps_run']} steps this run"
          f"{', resumed from step ' + str(summary['resumed_from']) if summary['resumed_from'] else ''}); "
          f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; merged vs adapter {key.replace('_', ' ')} "
          f"{summary['merge'][key]:.1e}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from prunefusion.compression.evaluate import evaluate, evaluate_encoders, load_task, rows_table, to_json

    causal = is_causal_checkpoint(args.models[0])
    held_out = texts_or_default(args.data, causal, "held_out")
    if causal:
        task = load_task(Path(args.task)) if args.task else None
        rows = to_json([evaluate(Path(m), held_out, task) for m in args.models])
    else:
        rows = evaluate_encoders([Path(m) for m in args.models], held_out)
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
                       keep_intermediate=args.keep_intermediate)
    start, end = manifest["removed"]
    metrics = manifest["metrics"]
    summary = ", ".join(f"{row['label']} {row['held_out_perplexity']:.2f}" for row in metrics["evaluation"]
                        if row.get("held_out_perplexity") is not None)
    print(f"{manifest['name']}: removed [{start}, {end}) ({manifest['strategy']}) -> {args.out} "
          f"(report.md, manifest.json){'; held-out perplexity ' + summary if summary else ''}")
    return 0


def _user_errors(command):
    """Bad input (a block that does not fit, unreadable data, a missing model) -> one line on stderr, exit 2."""
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except (ValueError, FileNotFoundError, OSError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2

    return run


def register(subparsers) -> None:
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
    m.set_defaults(func=_user_errors(_measure))

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
    p.add_argument("--force", action="store_true", help="replace --out; allow removing the final layer")
    calibration(p)
    p.set_defaults(func=_user_errors(_prune))

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
    h.add_argument("--checkpoint-every", type=int, default=50)
    h.add_argument("--device", default="cpu", help="cpu (float32 compute) or cuda (bfloat16 compute)")
    h.set_defaults(func=_user_errors(_heal))

    e = sub.add_parser("evaluate", help="perplexity, MC accuracy, decode speed, size: one table, first = baseline")
    e.add_argument("models", nargs="+", help="model directories (e.g. original pruned healed/merged)")
    e.add_argument("--data", nargs="*", default=[], help="held-out text (default: the stdlib corpus held-out split)")
    e.add_argument("--task", help='multiple-choice JSONL: {"context", "choices", "answer"} per line')
    e.add_argument("--out", help="also write evaluation.md and evaluation.json here")
    e.set_defaults(func=_user_errors(_evaluate))

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
    r.set_defaults(func=_user_errors(_run))
    add_export_parser(sub, _user_errors)
