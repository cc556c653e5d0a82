"""What API keys cost: unary Generate throughput at concurrency 16 and cache-hit latency, with and without auth.

    .venv/bin/python benchmarks/auth_overhead.py [--model-dir DIR] [--rounds 5] [--requests 96] [--hits 400]

Starts two `prunefusion serve` processes on the same model, identical but for `server.auth` (one key, no limits),
each with its own embedded Redis, and measures them in interleaved rounds (the order alternates), so drift on this
machine hits both alike. Throughput: `--requests` distinct 32-token greedy prompts from 16 threads, cache bypassed.
Hit: one cached request repeated from one thread (end to end at the client). Only one server is busy at a time.
Goals (issue 16): auth costs <= 3% of throughput and <= 0.2 ms on a cache hit.
Without --model-dir and no built default LM, a default-shaped LM is trained for 20 steps (speed, not quality).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _server import median_seconds, start_server

from prunefusion.home import default_model_dir

KEY = "pf-benchmark-key-0123456789"


def model_dir(arg: Path | None, tmp: Path) -> Path:
    if arg is not None:
        return arg
    if (default_model_dir("tiny-lm") / "config.json").is_file():
        return default_model_dir("tiny-lm")
    from prunefusion.models.build import build_model

    print("no built tiny-lm: training a default-shaped LM for 20 steps (same speed, not its quality)", flush=True)
    return build_model("default", tmp / "lm", steps=20, seed=0).path


def throughput(client, requests: int, round_id: int) -> float:
    from prunefusion_client import GenerateOptions

    options = GenerateOptions(max_new_tokens=32, cache_policy="bypass")
    start = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: client.generate(f"The os module, round {round_id} part {i}", options=options),
                      range(requests)))
    return requests / (time.perf_counter() - start)


def hit_latency_ms(client, hits: int) -> float:
    from prunefusion_client import GenerateOptions

    options = GenerateOptions(max_new_tokens=32)

    def fill() -> None:  # the first round's call is the miss that stores the entry
        assert client.generate("A cached prompt", options=options).usage.completion_tokens > 0

    def hit() -> None:
        assert client.generate("A cached prompt", options=options).cached

    return median_seconds(hit, hits, warmup=fill) * 1e3


def match_cost_us(key_count: int, repeats: int = 20_000) -> float:
    """The interceptor's key check alone (parse the header, hash, compare with every stored hash), in µs a call."""
    from prunefusion.server.auth.interceptor import AccessControl
    from prunefusion.server.auth.keys import ApiKey, KeyStore, hash_key

    keys = [ApiKey(f"k{i}", hash_key(f"pf-other-{i}")) for i in range(key_count - 1)] + [ApiKey("bench", hash_key(KEY))]
    access = AccessControl(KeyStore(keys), model_of=lambda service, name: name)
    header = [f"Bearer {KEY}"]
    start = time.perf_counter()
    for _ in range(repeats):
        access.authenticate(header)
    return (time.perf_counter() - start) / repeats * 1e6


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} [{min(values):.3f}, {max(values):.3f}]"


def measure(targets: dict[str, str], args: argparse.Namespace) -> list[dict]:
    from prunefusion_client import Client

    rows = []
    with Client(targets["off"], max_attempts=1) as off, Client(targets["on"], max_attempts=1, api_key=KEY) as on:
        clients = {"off": off, "on": on}
        for client in clients.values():  # warm up both (first calls pay for lazy set-up)
            throughput(client, 16, -1)
        for r in range(args.rounds):
            order = ["off", "on"] if r % 2 == 0 else ["on", "off"]
            row = {"round": r, "order": order}
            for name in order:
                row[f"throughput_{name}"] = throughput(clients[name], args.requests, r)
                row[f"hit_ms_{name}"] = hit_latency_ms(clients[name], args.hits)
            row["throughput_ratio"] = row["throughput_on"] / row["throughput_off"]
            row["hit_added_ms"] = row["hit_ms_on"] - row["hit_ms_off"]
            rows.append(row)
            print(f"round {r}: req/s off {row['throughput_off']:.1f} on {row['throughput_on']:.1f} "
                  f"(ratio {row['throughput_ratio']:.3f}); hit p50 off {row['hit_ms_off']:.3f} ms on "
                  f"{row['hit_ms_on']:.3f} ms (added {row['hit_added_ms']:+.3f} ms)", flush=True)
    return rows


def main() -> None:
    from prunefusion.server.auth.keys import hash_key

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=96, help="Generate calls per throughput measurement")
    parser.add_argument("--hits", type=int, default=400, help="cache hits per latency measurement")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "auth_overhead.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model = model_dir(args.model_dir, tmp)
        (tmp / "keys.txt").write_text(f"bench sha256:{hash_key(KEY).hex()}\n")
        processes, targets = {}, {}
        try:
            for name, server_yaml in (("off", ""), ("on", f"auth: {{api_keys_file: '{tmp / 'keys.txt'}'}}")):
                folder = tmp / name
                folder.mkdir()
                processes[name], targets[name] = start_server(model, folder, f"{{data_dir: '{folder / 'redis'}'}}",
                                                              server_yaml=server_yaml)
            rows = measure(targets, args)
        finally:
            for proc in processes.values():
                proc.terminate()
                proc.wait(60)
    ratios, added = [r["throughput_ratio"] for r in rows], [r["hit_added_ms"] for r in rows]
    summary = {"model": str(model), "rounds": rows, "throughput_ratio": spread(ratios),
               "hit_added_ms": spread(added), "goals": {"throughput_ratio_at_least": 0.97, "hit_added_ms_at_most": 0.2}}
    print(f"auth on / off, unary Generate req/s at concurrency 16: {summary['throughput_ratio']} "
          f"(median [min, max] of {len(rows)} rounds; goal >= 0.97)")
    print(f"cache-hit p50 added by auth: {summary['hit_added_ms']} ms (goal <= 0.2 ms)")
    summary["key_check_us"] = {n: round(match_cost_us(n), 2) for n in (1, 100, 1000)}
    print("the key check alone, µs a call by keys in the store:", summary["key_check_us"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
