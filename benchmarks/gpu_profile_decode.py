"""Diagnose batched decode speed on a GPU per dtype (why bf16 batches scaled worse than fp32 in gpu_check.py).

    python benchmarks/gpu_profile_decode.py --model-dir DIR

For float32 and bfloat16: ms per decode step of the engine's batched KV path at batch 1, 4, 16, the same for
transformers' own `generate` on a left-padded batch, and the top CUDA/CPU ops of a profiled batch-16 bf16 step.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from gpu_check import import_engine

DEVICE = "cuda"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def engine_steps(model, batch: int, steps: int) -> float:
    from transformers import DynamicCache

    from prunefusion.server.engines.kv_batch import BatchedKV

    kv = BatchedKV()
    with torch.inference_mode():
        for i in range(batch):
            cache = DynamicCache()
            ids = torch.arange(1, 6 + i, device=DEVICE)[None]
            model(input_ids=ids, past_key_values=cache, use_cache=True)
            kv.join(cache, ids.shape[1])
        tokens = torch.full((batch, 1), 7, device=DEVICE)
        for warm in (True, False):
            sync()
            start = time.perf_counter()
            for _ in range(3 if warm else steps):
                mask = kv.decode_mask()
                model(input_ids=tokens, attention_mask=mask, position_ids=kv.next_positions(),
                      past_key_values=kv.cache, use_cache=True)
                kv.after_decode(mask)
            sync()
        return (time.perf_counter() - start) / steps * 1e3


def generate_steps(model, batch: int, steps: int) -> float:
    ids = torch.randint(3, 100, (batch, 8), device=DEVICE)
    mask = torch.ones_like(ids)
    for i in range(batch):
        mask[i, : i % 4] = 0
    with torch.inference_mode():
        model.generate(ids, attention_mask=mask, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        sync()
        start = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
        sync()
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    from transformers import AutoModelForCausalLM

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    import_engine()
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype).to(DEVICE).eval()
        for batch in (1, 4, 16):
            print(f"{str(dtype):15} batch {batch:2d}: engine step {engine_steps(model, batch, args.steps):6.2f} ms, "
                  f"generate step {generate_steps(model, batch, args.steps):6.2f} ms")
        if dtype is torch.bfloat16:
            from torch.profiler import ProfilerActivity, profile

            cuda = DEVICE == "cuda"
            with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
                engine_steps(model, 16, 10)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
            if cuda:
                print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=8))


if __name__ == "__main__":
    main()
