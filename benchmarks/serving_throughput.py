"""Output tokens/s through the gRPC server vs sequential transformers `generate`, and TTFT gRPC vs in-process.

    .venv/bin/python benchmarks/serving_throughput.py [--model-dir DIR] [--requests 32] [--max-new-tokens 64]

Everything is measured in this one run on this machine, and printed as ratios:
  1. baseline: transformers `generate` (greedy, batch of one), the prompts one after another, in this process;
  2. the server (`prunefusion serve`, its own process) at concurrency 1, 4 and 16, same prompts, same greedy
     settings, so both produce the same tokens (checked);
  3. TTFT p50 of a streaming gRPC call vs an in-process `TorchEngine.generate` call, concurrency 1, alternating.
The server is idle while the in-process parts run, so the two never share the CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _server import start_server

from prunefusion.home import default_model_dir

PROMPTS = [
    "The os module", "Lists are mutable sequences", "The with statement", "Raised when an operation",
    "Return a new dictionary", "The socket module provides", "A class that", "This function returns",
    "Open a file and return", "The json module", "Decorators are", "The asyncio event loop",
    "Create a new thread", "Exceptions raised by", "Return the number of", "The re module",
]


def prompts(n: int) -> list[str]:
    return [PROMPTS[i % len(PROMPTS)] + ("" if i < len(PROMPTS) else f" ({i // len(PROMPTS)})") for i in range(n)]


def baseline_generate(model_dir: Path, texts: list[str], max_new_tokens: int) -> tuple[float, list[list[int]]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    outs = []
    with torch.inference_mode():
        model.generate(tok("warm up", return_tensors="pt").input_ids, max_new_tokens=4, do_sample=False)
        start = time.perf_counter()
        for text in texts:
            ids = tok(text, return_tensors="pt").input_ids
            outs.append(model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)[0, ids.shape[1]:].tolist())
        elapsed = time.perf_counter() - start
    return elapsed, outs


async def server_run(target: str, texts: list[str], max_new_tokens: int, concurrency: int):
    from prunefusion_client import AsyncClient, GenerateOptions

    async with AsyncClient(target, max_attempts=1) as client:
        sem = asyncio.Semaphore(concurrency)

        async def one(text):
            async with sem:
                return await client.generate(text, "", GenerateOptions(max_new_tokens=max_new_tokens))

        await client.generate("warm up", "", GenerateOptions(max_new_tokens=4))
        start = time.perf_counter()
        responses = await asyncio.gather(*(one(t) for t in texts))
        return time.perf_counter() - start, responses


async def ttft_pairs(target: str, model_dir: Path, texts: list[str]) -> tuple[list[float], list[float]]:
    """Time to first streamed chunk, alternating a gRPC call and an in-process engine call per prompt so that
    drift in machine load hits both alike. One new token, so the first chunk is the last: neither side has work
    left over (a cancelled longer stream would keep the server busy during the next in-process call)."""
    from prunefusion.server.config import TorchModelConfig
    from prunefusion.server.engines.base import GenerationRequest, SamplingParams
    from prunefusion.server.engines.torch_engine import TorchEngine
    from prunefusion_client import AsyncClient, GenerateOptions

    engine = TorchEngine(TorchModelConfig(name="bench", path=str(model_dir)))
    await engine.start()
    via_grpc, in_process = [], []
    async with AsyncClient(target, max_attempts=1) as client:
        for i, text in enumerate(texts):
            start = time.perf_counter()
            async for _ in client.generate_stream(text, "", GenerateOptions(max_new_tokens=1)):
                via_grpc.append(time.perf_counter() - start)
            start = time.perf_counter()
            async for _ in engine.generate(GenerationRequest(f"t{i}", text, SamplingParams(max_new_tokens=1))):
                in_process.append(time.perf_counter() - start)
    await engine.shutdown()
    return via_grpc, in_process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=default_model_dir("tiny-lm"))
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--ttft-samples", type=int, default=60)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if not (args.model_dir / "config.json").is_file():
        sys.exit(f"{args.model_dir} missing; run: prunefusion models build")
    texts = prompts(args.requests)
    print(f"model {args.model_dir}, {args.requests} requests x {args.max_new_tokens} new tokens (greedy), "
          f"{os.cpu_count()} CPUs")

    base_s, base_tokens = baseline_generate(args.model_dir, texts, args.max_new_tokens)
    n_tokens = sum(map(len, base_tokens))
    base_tps = n_tokens / base_s
    print(f"{'sequential transformers generate':<36} {base_tps:9.1f} tok/s   1.00x")
    results = {"baseline_tokens_per_s": base_tps, "server": {}}
    with tempfile.TemporaryDirectory() as tmp:
        # the cache is off: repeated prompts across concurrency levels must all run the model
        proc, target = start_server(args.model_dir, Path(tmp), "{enabled: false}")
        try:
            for c in (1, 4, 16):
                elapsed, responses = asyncio.run(server_run(target, texts, args.max_new_tokens, c))
                same = [list(r.token_ids) for r in responses] == base_tokens
                tps = sum(len(r.token_ids) for r in responses) / elapsed
                results["server"][c] = {"tokens_per_s": tps, "ratio": tps / base_tps, "same_tokens": same}
                print(f"{'gRPC server, concurrency ' + str(c):<36} {tps:9.1f} tok/s  {tps / base_tps:5.2f}x"
                      f"   same tokens as baseline: {same}")
            grpc_t, engine_t = asyncio.run(ttft_pairs(target, args.model_dir, prompts(args.ttft_samples)))
        finally:
            proc.terminate()
            proc.wait(60)
    g50, e50 = statistics.median(grpc_t), statistics.median(engine_t)
    results.update(ttft_grpc_p50_ms=g50 * 1e3, ttft_engine_p50_ms=e50 * 1e3, ttft_ratio=g50 / e50)
    print(f"TTFT p50: gRPC {g50 * 1e3:.2f} ms, in-process engine {e50 * 1e3:.2f} ms, ratio {g50 / e50:.3f}x "
          f"(goal <= 1.05x)")
    print(f"goal: >= 4x at concurrency 16 -> {results['server'][16]['ratio']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
