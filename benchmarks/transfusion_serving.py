"""Transfusion serving speed, measured side by side in one run:

1. images/s for 4 concurrent gRPC requests (batched by the server) vs the same 4 sent one after another;
2. the same at the sampler (one call of 4 vs 4 calls of 1), without gRPC;
3. KV-cached prompt prefix vs recomputing the prompt at every denoising step.

    python benchmarks/transfusion_serving.py --model ~/.cache/prunefusion/models/transfusion --out runs/tf-serving
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _server import median_seconds

PROMPTS = ["a red circle on the left", "a blue square in the center", "a green triangle at the top right",
           "a yellow circle at the bottom"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="a Transfusion model directory")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance-scale", type=float, default=3.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--wait-ms", type=float, default=10.0, help="the server's batch window (default config: 10)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    import torch

    from prunefusion.transfusion.sampling import ImageRequest, TransfusionSampler
    from prunefusion_client import Client, ImageOptions

    sampler = TransfusionSampler.load(args.model)
    reqs = [ImageRequest(p, args.steps, args.guidance_scale, seed=i) for i, p in enumerate(PROMPTS)]
    n = len(reqs)
    rows = {}
    serial = median_seconds(lambda: [sampler.generate_images([r]) for r in reqs], args.repeats)
    batched = median_seconds(lambda: sampler.generate_images(reqs), args.repeats)
    rows["sampler: 4 images, one call vs four"] = (n / serial, n / batched)
    for k in (1, n):
        cached = median_seconds(lambda k=k: sampler.generate_images(reqs[:k]), args.repeats)
        recomputed = median_seconds(lambda k=k: sampler.generate_images(reqs[:k], use_cache=False), args.repeats)
        rows[f"sampler: {k} image(s), recomputed prompt vs KV-cached prompt"] = (k / recomputed, k / cached)

    import tempfile

    import yaml

    from prunefusion.loadtest.server_process import ServerProcess

    config = Path(tempfile.mkdtemp()) / "serve.yaml"
    config.write_text(yaml.safe_dump({
        "server": {"host": "127.0.0.1", "port": 0, "metrics_port": None, "http_port": None, "log_level": "WARNING"},
        "cache": {"enabled": False},
        "models": [{"name": "tf", "path": str(args.model), "engine": "transfusion", "max_batch_size": 8,
                    "images": {"max_wait_ms": args.wait_ms}}]}))
    with ServerProcess(config, startup_timeout_s=300) as server, \
            Client(server.target, timeout=600, max_attempts=1) as client:

        def one(i: int):
            options = ImageOptions(steps=args.steps, guidance_scale=args.guidance_scale, seed=i)
            return client.generate_image(PROMPTS[i], options=options)

        serial_rpc = median_seconds(lambda: [one(i) for i in range(n)], args.repeats)
        batch_sizes: list[int] = []
        with ThreadPoolExecutor(n) as pool:

            def concurrent():
                batch_sizes.extend(r.timings.batch_size for r in pool.map(one, range(n)))

            concurrent_rpc = median_seconds(concurrent, args.repeats)
        rows["gRPC: 4 concurrent requests vs 4 serial"] = (n / serial_rpc, n / concurrent_rpc)

    print(f"model {args.model} ({sum(p.numel() for p in sampler.model.parameters()):,} parameters), "
          f"{args.steps} steps, guidance {args.guidance_scale}, torch threads {torch.get_num_threads()}")
    print(f"{'comparison':<62} {'baseline img/s':>14} {'fast img/s':>10} {'ratio':>6}")
    for name, (base, fast) in rows.items():
        print(f"{name:<62} {base:>14.2f} {fast:>10.2f} {fast / base:>5.2f}x")
    print(f"server batch sizes seen in the concurrent runs: {sorted(set(batch_sizes))}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "transfusion_serving.json").write_text(json.dumps(
            {"model": str(args.model), "steps": args.steps, "rows": {k: {"baseline_images_per_s": b,
                                                                          "fast_images_per_s": f, "ratio": f / b}
                                                                      for k, (b, f) in rows.items()},
             "batch_sizes": batch_sizes}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
