"""A peer's benchmark client against us and against vLLM: `vllm bench serve`, the same dataset, request rate and
output length, against (a) prunefusion's OpenAI-compatible HTTP port and (b) `vllm serve` of the same model.

    .venv/bin/python benchmarks/vllm_bench_serve.py [--model-dir DIR] [--num-prompts 48] [--request-rate 8]
                                                    [--input-len 64] [--output-len 64] [--max-concurrency 16]
                                                    [--rounds 3] [--json FILE]

Needs both environments: .venv (this script and `prunefusion serve`) and .venv-vllm (scripts/setup_vllm_cpu.sh:
`vllm serve` and `vllm bench serve`, run through benchmarks/_vllm_cli.py). Both servers start once and stay up
side by side; then `--rounds` rounds each run the benchmark against one and then the other (the order alternates
round by round), so this machine's drift hits both alike. Every request is greedy (temperature 0) with ignore_eos,
so each one yields exactly --output-len tokens on both servers; prompts are vLLM's random dataset with a fixed seed
(the same token ids in every run). The ratios printed are ours / vLLM's, the median over rounds, with the range.
prunefusion's response cache is off (every prompt would otherwise be a cache hit from round 2 on).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from prunefusion.home import default_model_dir
from prunefusion.loadtest.server_process import ServerProcess, free_port

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
VLLM_CLI = [str(VLLM_PYTHON), str(ROOT / "benchmarks" / "_vllm_cli.py")]
MODEL_NAME = "bench"
# (vllm bench serve's result key, the column, True when higher is better)
METRICS = [("output_throughput", "output tok/s", True), ("median_ttft_ms", "TTFT p50 ms", False),
           ("p99_ttft_ms", "TTFT p99 ms", False), ("median_itl_ms", "ITL p50 ms", False),
           ("p99_itl_ms", "ITL p99 ms", False), ("median_tpot_ms", "TPOT p50 ms", False)]


def wait_http_ok(url: str, proc: subprocess.Popen, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with {proc.returncode}; its log: {log}")
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} did not answer 200 within {timeout_s:.0f} s; its log: {log}")


def start_prunefusion(model_dir: Path, tmp: Path, batch: int, max_tokens: int) -> ServerProcess:
    config = tmp / "prunefusion.yaml"
    config.write_text(
        "server: {host: 127.0.0.1, log_level: WARNING, metrics_port: null}\n"
        "cache: {enabled: false}\n"
        f"models:\n  - {{name: {MODEL_NAME}, path: '{model_dir}', max_batch_size: {batch}, "
        f"max_new_tokens_limit: {max_tokens}}}\n")
    return ServerProcess(config, startup_timeout_s=300, log=tmp / "prunefusion.log")


def start_vllm(model_dir: Path, tmp: Path, batch: int, max_model_len: int) -> tuple[subprocess.Popen, str, Path]:
    port, log = free_port(), tmp / "vllm.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    command = VLLM_CLI + ["serve", str(model_dir), "--served-model-name", MODEL_NAME, "--host", "127.0.0.1",
                          "--port", str(port), "--max-num-seqs", str(batch), "--max-model-len", str(max_model_len),
                          "--enforce-eager"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http_ok(f"{url}/v1/models", proc, 600, log)
    except BaseException:
        proc.terminate()
        proc.wait(30)
        raise
    return proc, url, log


def bench(base_url: str, model_dir: Path, args, out: Path) -> dict:
    """One `vllm bench serve` run; its saved result."""
    command = VLLM_CLI + [
        "bench", "serve", "--backend", "openai", "--base-url", base_url, "--endpoint", "/v1/completions",
        "--model", MODEL_NAME, "--tokenizer", str(model_dir), "--dataset-name", "random",
        "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
        "--num-prompts", str(args.num_prompts), "--request-rate", str(args.request_rate),
        "--max-concurrency", str(args.max_concurrency), "--ignore-eos", "--temperature", "0", "--seed", "0",
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99", "--disable-tqdm",
        "--save-result", "--result-dir", str(out.parent), "--result-filename", out.name]
    run = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if run.returncode != 0 or not out.is_file():
        raise RuntimeError(f"vllm bench serve against {base_url} failed ({run.returncode}):\n{run.stdout[-3000:]}"
                           f"\n{run.stderr[-3000:]}")
    result = json.loads(out.read_text())
    if result.get("failed") or result.get("completed") != args.num_prompts:
        errors = [e for e in result.get("errors", []) if e][:3]
        raise RuntimeError(f"vllm bench serve against {base_url}: {result.get('completed')} of {args.num_prompts} "
                           f"completed; first errors: {errors}")
    return result


def table(samples: dict[str, list[dict]]) -> str:
    rows = ["| server | " + " | ".join(column for _, column, _ in METRICS) + " |",
            "|---|" + "---|" * len(METRICS)]
    for name, results in samples.items():
        cells = [f"{statistics.median(r[key] for r in results):.1f}" for key, _, _ in METRICS]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    ratios = []
    for key, _, _ in METRICS:
        each = [ours[key] / theirs[key] for ours, theirs in zip(samples["prunefusion"], samples["vllm"], strict=True)]
        ratios.append(f"{statistics.median(each):.2f}x ({min(each):.2f}-{max(each):.2f})")
    rows.append("| prunefusion / vLLM | " + " | ".join(ratios) + " |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=default_model_dir("tiny-lm"))
    parser.add_argument("--num-prompts", type=int, default=48)
    parser.add_argument("--request-rate", type=float, default=8.0, help="requests/s (Poisson arrivals)")
    parser.add_argument("--max-concurrency", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write every round's results here")
    args = parser.parse_args()
    if not VLLM_PYTHON.is_file():
        sys.exit(f"{VLLM_PYTHON} is missing: run scripts/setup_vllm_cpu.sh first")
    if not (args.model_dir / "config.json").is_file():
        sys.exit(f"{args.model_dir}: no model there (build it: prunefusion models build)")

    tmp = Path(tempfile.mkdtemp(prefix="vllm-bench-serve-"))
    max_len = args.input_len + args.output_len + 16
    ours = start_prunefusion(args.model_dir, tmp, args.max_concurrency, args.output_len)
    theirs = None
    try:
        wait_http_ok(f"{ours.http_url}/ready", ours.proc, 60, tmp / "prunefusion.log")
        theirs, vllm_url, _ = start_vllm(args.model_dir, tmp, args.max_concurrency, max_len)
        urls = {"prunefusion": ours.http_url, "vllm": vllm_url}
        for name, url in urls.items():  # warm-up: first-request costs stay out of round 1
            warm = argparse.Namespace(**{**vars(args), "num_prompts": 4})
            bench(url, args.model_dir, warm, tmp / f"warm-{name}.json")
        samples: dict[str, list[dict]] = {name: [] for name in urls}
        for round_no in range(args.rounds):
            order = list(urls) if round_no % 2 == 0 else list(urls)[::-1]
            for name in order:
                result = bench(urls[name], args.model_dir, args, tmp / f"{name}-{round_no}.json")
                samples[name].append(result)
                print(f"round {round_no + 1}/{args.rounds} {name}: {result['output_throughput']:.1f} out tok/s, "
                      f"TTFT p50 {result['median_ttft_ms']:.1f} ms, ITL p50 {result['median_itl_ms']:.1f} ms",
                      flush=True)
    finally:
        if theirs is not None:
            theirs.terminate()
            theirs.wait(60)
        ours.stop()
    print(f"\nvllm bench serve: {args.num_prompts} random prompts of {args.input_len} tokens, {args.output_len} "
          f"output tokens (ignore_eos, greedy), {args.request_rate:g} req/s, at most {args.max_concurrency} in "
          f"flight; medians of {args.rounds} interleaved rounds\n")
    print(table(samples))
    if args.json:
        keep = [key for key, _, _ in METRICS] + ["completed", "duration"]
        args.json.write_text(json.dumps({name: [{k: r.get(k) for k in keep} for r in results]
                                         for name, results in samples.items()}, indent=1))


if __name__ == "__main__":
    main()
