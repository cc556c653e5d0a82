"""`prunefusion compress measure | prune | heal | evaluate`.

    prunefusion compress measure --model DIR --out runs/measure [--data FILES...] [--samples 128 --seq-len 256]
    prunefusion compress prune --model DIR --out DIR --fraction 0.25 [--strategy angular] [--distances FILE]
    prunefusion compress prune --model DIR --out DIR --layers 4:6        # 0-based, half-open
    prunefusion compress heal --model PRUNED --out runs/heal [--steps 200 --lr 3e-4 --rank 8]
    prunefusion compress evaluate ORIGINAL PRUNED runs/heal/merged [--task mc.jsonl] [--out runs/eval]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def load_model(model_dir: Path):
    """A causal LM, or a bare encoder (BERT/MiniLM) when the checkpoint is not one; safetensors only, offline."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    causal = any(a.endswith(CAUSAL_SUFFIXES) for a in (config.architectures or []))
    loader = AutoModelForCausalLM if causal else AutoModel
    model = loader.from_pretrained(model_dir, use_safetensors=True, local_files_only=True).eval()
    return model, AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


def load_texts(paths: list[str]) -> list[str]:
    """Plain text (documents split at blank lines), JSONL (a "text" field per line), or a `datasets` directory
    saved with save_to_disk. No paths: the training split of the stdlib corpus the default LM is trained on."""
    if not paths:
        from prunefusion.models.corpus import stdlib_corpus

        return stdlib_corpus().train  # never the held-out documents: they measure the result
    texts: list[str] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            from datasets import load_from_disk

            texts += [t for t in load_from_disk(str(path))["text"] if t and t.strip()]
        elif path.suffix == ".jsonl":
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if line.strip():
                    try:
                        texts.append(json.loads(line)["text"])
                    except (json.JSONDecodeError, KeyError) as err:
                        raise ValueError(f"{path}:{number}: expected a JSON object with a 'text' field") from err
        else:
            texts += [d.strip() for d in path.read_text().split("\n\n") if d.strip()]
    if not texts:
        raise ValueError(f"no text found in {paths}")
    return texts


def run_measure(model_dir: Path, out: Path, data: list[str], samples: int, seq_len: int, batch_size: int):
    from prunefusion.compression.measure import measure, tokenized_batches
    from prunefusion.compression.report import plot, write_csv
    from prunefusion.server.engines.hf_loading import digest_files, weight_files

    model, tokenizer = load_model(model_dir)
    texts = load_texts(data)[:samples]
    batches = tokenized_batches(tokenizer, texts, seq_len, batch_size)
    table = measure(model, batches, total=len(batches))
    table.meta = {"model": str(model_dir), "weights_digest": digest_files(weight_files(model_dir)),
                  "calibration": {"sources": data or ["stdlib corpus"], "seq_len": seq_len, "batch_size": batch_size}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "distances.json").write_text(json.dumps(table.to_json(), indent=1) + "\n")
    write_csv(table, out / "distances.csv")
    plot(table, out / "distance_heatmap.png", out / "best_blocks.png", f"{model_dir.name}: angular distances")
    return table


def _measure(args: argparse.Namespace) -> int:
    table = run_measure(Path(args.model), Path(args.out), args.data, args.samples, args.seq_len, args.batch_size)
    print(f"{table.samples} samples, {table.num_layers} layers -> {args.out}/distances.json, distances.csv, "
          "distance_heatmap.png, best_blocks.png")
    for n in range(1, table.num_layers - 1):
        start, d = table.best(n)
        print(f"  n={n:2d}: drop [{start}, {start + n})  d={d:.4f}")
    return 0


def _prune(args: argparse.Namespace) -> int:
    import torch

    from prunefusion.compression.layers import find_layers, prune_layers
    from prunefusion.compression.measure import DistanceTable
    from prunefusion.compression.strategies import NEEDS_TABLE, STRATEGIES, block_size
    from prunefusion.server.engines.hf_loading import digest_files, weight_files

    model_dir, out = Path(args.model), Path(args.out)
    if out.exists() and not args.force:
        print(f"error: {out} exists; pass --force to replace it", file=sys.stderr)
        return 1
    model, tokenizer = load_model(model_dir)
    total = len(find_layers(model)[1])
    table = None
    if args.layers:
        start, end = (int(x) for x in args.layers.split(":"))
        strategy = "explicit"
    else:
        size = block_size(total, args.n, args.fraction)
        if args.strategy in NEEDS_TABLE:
            table = (DistanceTable.from_json(json.loads(Path(args.distances).read_text())) if args.distances
                     else run_measure(model_dir, out.with_name(out.name + ".measure"), args.data, args.samples,
                                      args.seq_len, args.batch_size))
            if table.num_layers != total:
                raise ValueError(f"distances are for {table.num_layers} layers, the model has {total}")
        start = STRATEGIES[args.strategy](table, size, total)
        end, strategy = start + size, args.strategy
    pruned, record = prune_layers(model, start, end, inplace=True, allow_last=args.force)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    pruned.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    # verify: reloads with no missing/unexpected keys and the same outputs as the in-memory model
    reloaded, info = type(pruned).from_pretrained(tmp, output_loading_info=True)
    if info["missing_keys"] or info["unexpected_keys"]:
        raise RuntimeError(f"pruned checkpoint does not reload cleanly: {info}")
    ids = tokenizer("The quick brown fox jumps over the lazy dog", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a, b = pruned(input_ids=ids)[0], reloaded.eval()(input_ids=ids)[0]
    if not torch.allclose(a, b, atol=1e-5, rtol=1e-4):
        raise RuntimeError("pruned checkpoint's outputs differ from the in-memory pruned model")
    manifest = {"kind": "prunefusion.pruned", "source": str(model_dir),
                "source_weights_digest": digest_files(weight_files(model_dir)), "strategy": strategy,
                **record, "distance": (table.last_token[end - start][start] if table else None),
                "weights_digest": digest_files(sorted(tmp.glob("*.safetensors")))}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    print(f"pruned {model_dir} -> {out}: removed layers [{start}, {end}) ({strategy}), {total} -> "
          f"{total - (end - start)} layers; reload verified")
    return 0


def _heal(args: argparse.Namespace) -> int:
    from prunefusion.compression.heal import HealConfig, heal

    cfg = HealConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, learning_rate=args.lr,
                     warmup_steps=args.warmup, rank=args.rank, quantize=not args.no_quantize,
                     checkpoint_every=args.checkpoint_every, device=args.device,
                     targets=tuple(args.targets) if args.targets else None)
    summary = heal(Path(args.model), Path(args.out), load_texts(args.data), cfg)
    losses = summary["losses"]
    print(f"healed {args.model} -> {args.out}/merged ({summary['steps_run']} steps this run"
          f"{', resumed from step ' + str(summary['resumed_from']) if summary['resumed_from'] else ''}); "
          f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; merged vs adapter max logit difference "
          f"{summary['merge']['max_logit_difference']:.1e}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from prunefusion.compression.evaluate import evaluate, load_task, markdown_table, to_json

    if args.data:
        held_out = load_texts(args.data)
    else:
        from prunefusion.models.corpus import stdlib_corpus

        held_out = stdlib_corpus().held_out
    task = load_task(Path(args.task)) if args.task else None
    results = [evaluate(Path(m), held_out, task) for m in args.models]
    table = markdown_table(results)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "evaluation.md").write_text(table + "\n")
        (out / "evaluation.json").write_text(json.dumps(to_json(results), indent=1) + "\n")
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
    p.add_argument("--force", action="store_true", help="replace --out; allow removing the final layer")
    calibration(p)
    p.set_defaults(func=_user_errors(_prune))

    h = sub.add_parser("heal", help="QLoRA-heal a pruned model, merge into a plain checkpoint (OUT/merged)")
    h.add_argument("--model", required=True, help="the pruned model directory")
    h.add_argument("--out", required=True, help="checkpoints/, adapter/, merged/, heal_loss.png; reruns resume")
    h.add_argument("--data", nargs="*", default=[], help="training text (default: the stdlib corpus)")
    h.add_argument("--steps", type=int, default=200)
    h.add_argument("--batch-size", type=int, default=8)
    h.add_argument("--seq-len", type=int, default=256)
    h.add_argument("--lr", type=float, default=3e-4)
    h.add_argument("--warmup", type=int, default=20)
    h.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = rank)")
    h.add_argument("--targets", nargs="*", help="module names for LoRA (default: the family's FFN projections)")
    h.add_argument("--no-quantize", action="store_true", help="plain LoRA on the unquantized base")
    h.add_argument("--checkpoint-every", type=int, default=50)
    h.add_argument("--device", default="cpu", help="cpu (float32 compute) or cuda (bfloat16 compute)")
    h.set_defaults(func=_user_errors(_heal))

    e = sub.add_parser("evaluate", help="perplexity, MC accuracy, decode speed, size: one table, first = baseline")
    e.add_argument("models", nargs="+", help="model directories (e.g. original pruned healed/merged)")
    e.add_argument("--data", nargs="*", default=[], help="held-out text (default: the stdlib corpus held-out split)")
    e.add_argument("--task", help='multiple-choice JSONL: {"context", "choices", "answer"} per line')
    e.add_argument("--out", help="also write evaluation.md and evaluation.json here")
    e.set_defaults(func=_user_errors(_evaluate))
