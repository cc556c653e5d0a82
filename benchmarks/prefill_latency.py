"""Prefix caching and chunked prefill on the torch engine's slot path (issue 22, parts 2, 3 and 5).

    .venv/bin/python benchmarks/prefill_latency.py [--model DIR] [--rounds 3] [--chunks 64 128 256]
                                                    [--prefix-tokens 512] [--streams 15] [--out DIR]

Two measurements on the engine itself (in process, streaming, greedy, one torch engine at a time):

1. **TTFT with a shared prefix**: prompts of `--prefix-tokens` shared tokens (stdlib prose) plus a short question,
   one at a time; a *miss* changes the prompt's first word (no block of it is cached), a *hit* keeps the shared
   prefix and changes only the question. Miss and hit alternate (interleaved), after one warming request; TTFT is
   the engine's own arrival-to-first-token time.
2. **Inter-token latency while a long prompt arrives**: `--streams` greedy streams decode; once they all run, a
   prompt of nearly the context length arrives. The streams' gaps between tokens are recorded; "steady" is their
   gaps before the arrival, "during" the gaps that end between the arrival and the long prompt's first token plus
   one more step. The engine runs with each `--chunks` size and with whole-prompt prefill (null), in interleaved
   rounds (a fresh engine per configuration and round).

Results: a table per measurement on stdout and in `--out` (JSON and markdown).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import statistics
import time
from pathlib import Path

from transformers import AutoTokenizer

from prunefusion.home import default_model_dir
from prunefusion.models.corpus import stdlib_corpus
from prunefusion.server.config import TorchModelConfig
from prunefusion.server.engines.base import GenerationRequest, SamplingParams, collect
from prunefusion.server.engines.torch_engine import TorchEngine


@functools.cache
def held_out_words() -> list[str]:
    return " ".join(stdlib_corpus().held_out).split()


def text_of_tokens(tokenizer, tokens: int, skip_words: int = 0) -> str:
    """Stdlib prose of about `tokens` tokens (the tokenizer's own count, special tokens included)."""
    words = held_out_words()[skip_words:skip_words + 2 * tokens]
    low, high = 1, len(words)
    while low < high:  # the most words whose encoding fits
        mid = (low + high + 1) // 2
        if len(tokenizer(" ".join(words[:mid])).input_ids) <= tokens:
            low = mid
        else:
            high = mid - 1
    return " ".join(words[:low])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def started(cfg: TorchModelConfig) -> TorchEngine:
    engine = TorchEngine(cfg)
    await engine.start()
    return engine


async def ttft_rounds(cfg: TorchModelConfig, tokenizer, prefix_tokens: int, rounds: int) -> dict:
    engine = await started(cfg)
    shared = text_of_tokens(tokenizer, prefix_tokens)
    params = SamplingParams(max_new_tokens=1, ignore_eos=True)
    out: dict[str, list[float]] = {"miss": [], "hit": []}
    try:
        await collect(engine.generate(GenerationRequest("warm", shared + " Warm up?", params)))
        for i in range(rounds):
            for kind in ("miss", "hit"):
                prompt = (f"Request {i} {kind}: " if kind == "miss" else "") + shared + f" Question {i} {kind}?"
                result = await collect(engine.generate(GenerationRequest(f"{kind}{i}", prompt, params)))
                out[kind].append(result.timings.time_to_first_token_seconds)
        out["prompt_tokens"] = [len(tokenizer(shared).input_ids)]
        out["hit_tokens"] = [engine.prefix_cache.hit_tokens]
    finally:
        await engine.shutdown()
    return out


async def arrival_round(cfg: TorchModelConfig, tokenizer, streams: int, long_tokens: int) -> dict:
    """The streams' inter-token gaps before and during a long prompt's prefill."""
    engine = await started(cfg)
    gaps: list[tuple[float, float]] = []  # (end time, gap)
    long_first = {}

    async def stream(i: int) -> None:
        request = GenerationRequest(f"s{i}", text_of_tokens(tokenizer, 24, skip_words=40 * i),
                                    SamplingParams(max_new_tokens=long_tokens, ignore_eos=True))
        last = None
        async with contextlib.aclosing(engine.generate(request)) as chunks:  # leaving the loop cancels it
            async for _ in chunks:
                now = time.monotonic()
                if last is not None:
                    gaps.append((now, now - last))
                last = now
                if "done" in long_first and now > long_first["done"] + 0.5:
                    break

    long_prompt = text_of_tokens(tokenizer, engine._loaded.context_length - 64, skip_words=3000)  # before: the
    # search over tokenizations would hold the event loop (and the streams' gaps) after the arrival
    try:
        tasks = [asyncio.create_task(stream(i)) for i in range(streams)]
        while engine.stats().running < streams or len(gaps) < 40 * streams:
            if failed := [t for t in tasks if t.done()]:
                failed[0].result()  # a stream that ended early raises here
            await asyncio.sleep(0.01)
        arrival = time.monotonic()
        async for _ in engine.generate(GenerationRequest("long", long_prompt, SamplingParams(max_new_tokens=1))):
            long_first["done"] = time.monotonic()
        await asyncio.gather(*tasks)
    finally:
        await engine.shutdown()
    steady = [g for t, g in gaps if t < arrival]
    # the gaps that end after the arrival, up to the long prompt's first token and the step after it
    during = [g for t, g in gaps if arrival < t <= long_first["done"] + max(steady)]
    return {"steady_p50": statistics.median(steady), "during_p50": statistics.median(during),
            "during_p99": percentile(during, 0.99), "during_max": max(during), "during_gaps": len(during),
            "long_ttft": long_first["done"] - arrival}


async def main_async(args) -> None:
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    base = TorchModelConfig(name="lm", path=str(args.model), max_batch_size=16)
    lines = []

    ttft = await ttft_rounds(base, tokenizer, args.prefix_tokens, args.rounds * 4)
    ratios = [h / m for h, m in zip(ttft["hit"], ttft["miss"], strict=True)]
    hit, miss = statistics.median(ttft["hit"]), statistics.median(ttft["miss"])
    lines += [f"### TTFT with a shared {ttft['prompt_tokens'][0]}-token prefix ({len(ratios)} interleaved pairs)",
              "", "| | TTFT p50 ms | min-max ms |", "|---|---|---|",
              f"| miss | {miss * 1e3:.1f} | {min(ttft['miss']) * 1e3:.1f}-{max(ttft['miss']) * 1e3:.1f} |",
              f"| hit | {hit * 1e3:.1f} | {min(ttft['hit']) * 1e3:.1f}-{max(ttft['hit']) * 1e3:.1f} |", "",
              f"hit / miss p50 = **{hit / miss:.3f}** (per pair {min(ratios):.3f}-{max(ratios):.3f}; goal <= 0.3)", ""]
    print("\n".join(lines), flush=True)

    configs = {f"chunk {c}": c for c in args.chunks} | {"whole prompt": None}
    rounds: dict[str, list[dict]] = {name: [] for name in configs}
    for r in range(args.rounds):
        for name, chunk in (configs.items() if r % 2 == 0 else reversed(configs.items())):
            cfg = base.model_copy(update={"prefill_chunk_tokens": chunk})
            result = await arrival_round(cfg, tokenizer, args.streams, args.stream_tokens)
            rounds[name].append(result)
            print(f"round {r} {name}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                    for k, v in result.items()), flush=True)
    table = [f"### {args.streams} streams' inter-token latency while a {base.context_length or 'context'}-length "
             f"prompt arrives ({args.rounds} rounds)", "",
             "| prefill | steady ITL p50 ms | ITL p99 during arrival ms | p99 / steady p50 (per round) | "
             "long prompt's TTFT ms |", "|---|---|---|---|---|"]
    for name, results in rounds.items():
        ratio = [x["during_p99"] / x["steady_p50"] for x in results]
        table.append(f"| {name} | {statistics.median(x['steady_p50'] for x in results) * 1e3:.1f} | "
                     f"{statistics.median(x['during_p99'] for x in results) * 1e3:.1f} | "
                     f"{statistics.median(ratio):.2f} ({min(ratio):.2f}-{max(ratio):.2f}) | "
                     f"{statistics.median(x['long_ttft'] for x in results) * 1e3:.0f} |")
    table.append("\ngoal: p99 during the arrival <= 2x the steady p50")
    print("\n" + "\n".join(table))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prefill_latency.json").write_text(json.dumps({"ttft": ttft, "arrival": rounds}, indent=1) + "\n")
    (args.out / "prefill_latency.md").write_text("\n".join(lines + table) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=default_model_dir("tiny-lm"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--chunks", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--prefix-tokens", type=int, default=512)
    ap.add_argument("--streams", type=int, default=15)
    ap.add_argument("--stream-tokens", type=int, default=500, help="tokens each stream may generate (a bound)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    main()
