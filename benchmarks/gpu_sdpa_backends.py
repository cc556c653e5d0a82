"""Which SDPA backend makes batched bf16 decode slow on the GPU? Times the engine's decode step per backend set.

    python benchmarks/gpu_sdpa_backends.py --model-dir DIR
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from gpu_check import import_engine
from gpu_profile_decode import engine_steps, generate_steps
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKEND_SETS = {
    "default": None,
    "no-cudnn": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION],
    "math": [SDPBackend.MATH],
}


def main() -> None:
    from transformers import AutoModelForCausalLM

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", type=Path, required=True)
    args = parser.parse_args()
    import_engine()
    for dtype in (torch.bfloat16, torch.float32):
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype).cuda().eval()
        for name, backends in BACKEND_SETS.items():
            for batch in (4, 16):
                if backends is None:
                    e, g = engine_steps(model, batch, 40), generate_steps(model, batch, 40)
                else:
                    with sdpa_kernel(backends):
                        e, g = engine_steps(model, batch, 40), generate_steps(model, batch, 40)
                print(f"{str(dtype):15} {name:10} batch {batch:2d}: engine {e:6.2f} ms/step, generate {g:6.2f} ms/step")


if __name__ == "__main__":
    main()
