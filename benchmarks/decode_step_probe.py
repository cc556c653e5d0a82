"""Where a batched decode step's time goes, and what a slot KV cache alone buys (issue 22, groundwork for part 1).

    .venv/bin/python benchmarks/decode_step_probe.py [--model DIR] [--batch 16] [--steps 64] [--rounds 3]
                                                      [--threads 2] [--profile]

Two decode steps over the same batch (`--batch` rows, prompts of 40-85 tokens, the same input token every step),
timed in interleaved rounds of `--steps` steps each:
  - `hf`:     the torch engine's transformers path (fast_decode: false): transformers' forward over a DynamicCache
              that grows by concatenation each step, with a [B, S+1] mask and position ids (kv_batch.py's BatchedKV);
  - `slots`:  the fast path (server/engines/slot_kv.py): the model's own modules over a preallocated slot cache, new
              keys written in place, SDPA over the first W columns.
Before timing, the slot step's greedy tokens (a prompt prefilled, 29 decode steps) are compared with transformers'
`generate`: the script stops if they differ. `--profile` prints torch.profiler's top operators of the slot step.
(The first version of this script, commit 8184863, also timed attention as two matmuls and fused q/k/v and
gate/up GEMMs: neither beat SDPA, see RESULTS.md.)
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from prunefusion.home import default_model_dir
from prunefusion.server.engines.kv_batch import BatchedKV
from prunefusion.server.engines.slot_kv import SlotKV, refusal


def joined(kv: BatchedKV | SlotKV, model, prompts: list[torch.Tensor]) -> BatchedKV | SlotKV:
    """The engine's way: each prompt prefilled alone by transformers, then joined to the batch's cache."""
    for prompt in prompts:
        cache = DynamicCache()
        model(input_ids=prompt, past_key_values=cache, use_cache=True)
        kv.join(cache, prompt.shape[1])
    return kv


def check_against_generate(model, prompt: torch.Tensor, tokens: int = 30) -> None:
    expected = model.generate(prompt, max_new_tokens=tokens, do_sample=False, min_new_tokens=tokens)
    slots = SlotKV(model, 1, prompt.shape[1] + tokens)
    cache = DynamicCache()
    got = [int(model(input_ids=prompt, past_key_values=cache, use_cache=True).logits[0, -1].argmax())]
    slots.join(cache, prompt.shape[1])
    while len(got) < tokens:
        got.append(int(slots.decode_logits(model, torch.tensor([[got[-1]]]))[0].argmax()))
    if got != expected[0, prompt.shape[1]:].tolist():
        raise SystemExit(f"slot step != generate:\n  {got}\n  {expected[0, prompt.shape[1]:].tolist()}")
    print(f"oracle: the slot step's {tokens} greedy tokens equal transformers' generate")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=default_model_dir("tiny-lm"))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=64, help="decode steps timed per engine per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--profile", action="store_true", help="print the slot step's top operators")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    if why := refusal(model, model.config.max_position_embeddings):
        raise SystemExit(f"{args.model}: no slot decode step: {why}")
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, model.config.vocab_size, (1, 40 + 3 * i), generator=gen) for i in range(args.batch)]
    step_input = torch.randint(3, model.config.vocab_size, (args.batch, 1), generator=gen)
    max_len = max(p.shape[1] for p in prompts) + args.steps * args.rounds + 21  # + 20 profiled steps
    with torch.inference_mode():
        check_against_generate(model, prompts[0])
        padded = joined(BatchedKV(), model, prompts)  # left-padded rows: the torch engine's transformers path
        slots = joined(SlotKV(model, len(prompts), max_len), model, prompts)
        steps = {"hf": lambda: padded.decode_logits(model, step_input),
                 "slots": lambda: slots.decode_logits(model, step_input)}
        times: dict[str, list[float]] = {name: [] for name in steps}
        for round_index in range(args.rounds):
            order = list(steps)[round_index % len(steps):] + list(steps)[:round_index % len(steps)]
            for name in order:
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    steps[name]()
                times[name].append((time.perf_counter() - t0) / args.steps * 1e3)
        print(f"batch {args.batch}, {args.steps} steps x {args.rounds} rounds, {args.threads} torch threads")
        for name, ms in times.items():
            ratios = [h / t for h, t in zip(times["hf"], ms, strict=True)]
            print(f"  {name:12s} {statistics.median(ms):6.2f} ms/step (rounds {' '.join(f'{t:.2f}' for t in ms)})"
                  f"  hf / this {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})")
        if args.profile:
            from torch.profiler import profile

            with profile() as prof:
                for _ in range(20):
                    steps["slots"]()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


if __name__ == "__main__":
    main()
