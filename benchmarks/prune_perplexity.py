"""Held-out perplexity of the default LM with n layers removed, by strategy, before healing; and the cost of the
one-pass distance table against one plain forward pass over the same calibration set.

    .venv/bin/python benchmarks/prune_perplexity.py [--model-dir DIR] [--fraction 0.25] [--samples 128]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from prunefusion.compression.layers import prune_layers
from prunefusion.compression.measure import measure, tokenized_batches
from prunefusion.compression.strategies import STRATEGIES, block_size
from prunefusion.home import default_model_dir
from prunefusion.model_kinds import load_model
from prunefusion.models.build import pack_documents, perplexity, windows
from prunefusion.models.corpus import stdlib_corpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=default_model_dir("tiny-lm"))
    parser.add_argument("--fraction", type=float, default=0.25)
    parser.add_argument("--samples", type=int, default=128)
    args = parser.parse_args()
    model, tokenizer = load_model(args.model_dir)
    corpus = stdlib_corpus()
    batches = tokenized_batches(tokenizer, corpus.train[: args.samples], 256, 8)

    with torch.inference_mode():
        start = time.perf_counter()
        for batch in batches:
            model(**batch)
        plain = time.perf_counter() - start
    start = time.perf_counter()
    table = measure(model, batches, total=len(batches))
    measured = time.perf_counter() - start
    print(f"distance table: {measured:.2f} s vs one plain forward pass {plain:.2f} s -> {measured / plain:.2f}x "
          f"(goal <= 1.3)")

    held = windows(pack_documents(tokenizer, corpus.held_out), 256)
    total = table.num_layers
    n = block_size(total, None, args.fraction)
    base = perplexity(model, held)
    print(f"{args.model_dir.name}: {total} layers, removing n={n}; held-out perplexity unpruned {base:.2f}")
    by_start = {}
    for first in range(total - n):  # every block that keeps the final layer
        pruned, _ = prune_layers(model, first, first + n)
        by_start[first] = perplexity(pruned, held)
        print(f"  drop [{first}, {first + n})  d={table.last_token[n][first]:.4f}  held-out perplexity "
              f"{by_start[first]:8.2f}  ({by_start[first] / base:.2f}x unpruned)")
    for name, strategy in STRATEGIES.items():
        first = strategy.choose(table, n, total, 0)
        print(f"  {name:16} picks [{first}, {first + n}): perplexity {by_start[first]:.2f}")
    mean = sum(by_start.values()) / len(by_start)
    print(f"  {'random block':16} expected perplexity (mean over all {len(by_start)} blocks): {mean:.2f}")


if __name__ == "__main__":
    main()
