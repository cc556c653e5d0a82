"""LM throughput with idle neighbour models: does a model nobody calls slow the one everybody calls?

    .venv/bin/python benchmarks/idle_neighbours.py [--rounds 3] [--requests 16] [--max-new-tokens 64] [--json FILE]

Three servers (`prunefusion serve`, each its own process), all up for the whole run and called one at a time:
  - `alone`:      tiny-lm only;
  - `+image`:     tiny-lm and a Transfusion model beside it, never called;
  - `default`:    the default config's three models (tiny-lm, tiny-lm-pruned, transfusion), only tiny-lm called.
Each round sends `--requests` concurrent unary Generate calls of `--max-new-tokens` greedy tokens (ignore_eos,
cache bypassed) to each server in turn, the order rotating; the baseline is sequential transformers `generate` with
one torch thread on the same prompts, in this process. Printed: output tok/s per server as a multiple of the
baseline, and each server's ratio to `alone` per round (goal: 1.0x, an idle model costs nothing).

The models are the ones in $PRUNEFUSION_HOME (tiny-lm must be built: `prunefusion models build`); a missing
tiny-lm-pruned is stood in for by a second tiny-lm engine and a missing transfusion by a pico Transfusion model with
random weights (an idle neighbour's cost is its threads, not its size); the output says which was used.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from serving_throughput import baseline_generate, prompts

from prunefusion.home import default_model_dir
from prunefusion.loadtest.server_process import ServerProcess
from prunefusion_client import Client, GenerateOptions


def pico_transfusion(out: Path) -> Path:
    import torch

    from prunefusion.transfusion import shapes
    from prunefusion.transfusion.build import save_model
    from prunefusion.transfusion.model import Transfusion, TransfusionConfig
    from prunefusion.transfusion.tokenizer import WordTokenizer

    torch.manual_seed(0)
    tok = WordTokenizer(shapes.caption_words())
    save_model(Transfusion(TransfusionConfig(vocab_size=len(tok), d_model=32, n_layers=2, n_heads=2,
                                             patch_size=8)).eval(), tok, out)
    return out


def neighbours(tmp: Path) -> tuple[dict[str, list[dict]], list[str]]:
    """The three servers' model lists, and what stood in for a model that is not built."""
    lm = default_model_dir("tiny-lm")
    pruned, image = default_model_dir("tiny-lm-pruned"), default_model_dir("transfusion")
    notes = []
    if not (pruned / "config.json").is_file():
        pruned, notes = lm, [*notes, "tiny-lm-pruned: not built, a second tiny-lm engine stands in"]
    if not (image / "model.safetensors").is_file():
        image = pico_transfusion(tmp / "pico-transfusion")
        notes.append("transfusion: not built, a pico Transfusion (random weights) stands in")
    main = {"name": "tiny-lm", "path": str(lm), "max_batch_size": 16}
    tf = {"name": "transfusion", "path": str(image), "engine": "transfusion"}
    return {"alone": [main], "+image": [main, tf],
            "default": [main, {"name": "tiny-lm-pruned", "path": str(pruned), "max_batch_size": 16}, tf]}, notes


def start(name: str, models: list[dict], tmp: Path) -> ServerProcess:
    config = tmp / f"{name}.yaml"
    config.write_text(json.dumps({"server": {"host": "127.0.0.1", "log_level": "WARNING", "metrics_port": None,
                                             "http_port": None, "build_missing_models": False},
                                  "cache": {"enabled": False}, "quality": {"enabled": False}, "models": models}))
    return ServerProcess(config, startup_timeout_s=600, log=tmp / f"{name}.log")


def burst(target: str, texts: list[str], max_new_tokens: int) -> tuple[float, list[tuple[int, ...]]]:
    options = GenerateOptions(max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True, cache_policy="bypass")
    with Client(target, timeout=600, max_attempts=1) as client, ThreadPoolExecutor(len(texts)) as pool:
        client.generate("warm up", model="tiny-lm", options=GenerateOptions(max_new_tokens=4))
        begin = time.perf_counter()
        replies = list(pool.map(lambda t: client.generate(t, model="tiny-lm", options=options), texts))
        seconds = time.perf_counter() - begin
    return sum(len(r.token_ids) for r in replies) / seconds, [tuple(r.token_ids) for r in replies]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    lm = default_model_dir("tiny-lm")
    if not (lm / "config.json").is_file():
        sys.exit(f"{lm}: not built (prunefusion models build)")
    import torch

    torch.set_num_threads(1)  # the baseline: sequential generate on one thread
    texts = prompts(args.requests)
    tmp = Path(tempfile.mkdtemp(prefix="idle-neighbours-"))
    configs, notes = neighbours(tmp)
    servers: dict[str, ServerProcess] = {}
    try:
        for name, models in configs.items():
            servers[name] = start(name, models, tmp)
        tok_s: dict[str, list[float]] = {name: [] for name in servers}
        baseline: list[float] = []
        names = list(servers)
        for r in range(args.rounds):
            seconds, _ = baseline_generate(lm, texts, args.max_new_tokens)
            baseline.append(args.requests * args.max_new_tokens / seconds)
            for name in names[r % len(names):] + names[:r % len(names)]:
                speed, _ = burst(servers[name].target, texts, args.max_new_tokens)
                tok_s[name].append(speed)
            print(f"round {r + 1}/{args.rounds}: generate {baseline[-1]:.0f} tok/s; "
                  + ", ".join(f"{n} {tok_s[n][-1]:.0f}" for n in names), flush=True)
    finally:
        for server in servers.values():
            server.stop()
    for note in notes:
        print(f"note: {note}")
    print(f"\n{args.requests} concurrent unary Generate x {args.max_new_tokens} tokens, tiny-lm called, medians of "
          f"{args.rounds} rounds\n")
    print("| server | output tok/s | x generate (1 thread) | / alone, per round |\n|---|---|---|---|")
    rows = {}
    for name in names:
        vs_alone = [a / b for a, b in zip(tok_s[name], tok_s["alone"], strict=True)]
        vs_generate = [a / b for a, b in zip(tok_s[name], baseline, strict=True)]
        rows[name] = {"tok_s": tok_s[name], "vs_generate": vs_generate, "vs_alone": vs_alone}
        print(f"| {name} | {statistics.median(tok_s[name]):.0f} | {statistics.median(vs_generate):.2f}x | "
              + " / ".join(f"{x:.2f}" for x in vs_alone) + " |")
    if args.json:
        args.json.write_text(json.dumps({"baseline_tok_s": baseline, "rows": rows, "notes": notes}, indent=1))


if __name__ == "__main__":
    main()
