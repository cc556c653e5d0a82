"""Which Transfusion recipe? Train variants (patch size, linear vs conv patchify, x0 vs v, caption order, width) and
score each with the same evaluation, side by side in one run.

Step counts are given per variant, so variants can be compared at equal CPU time (steps = budget / the variant's CPU
step time, measured on the 2-core machine) even when the sweep itself runs on a GPU:

    python benchmarks/transfusion_recipes.py --device cuda --out runs/tf-sweep p8lin:13600 p8conv:6700 p4lin:5600
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from prunefusion.transfusion import shapes
from prunefusion.transfusion.build import RECIPES, train
from prunefusion.transfusion.evaluate import EvalSettings, evaluate
from prunefusion.transfusion.sampling import TransfusionSampler

VARIANTS = {
    "p4conv": {},
    "p8conv": {"patch_size": 8},
    "p4lin": {"patchify": "linear"},
    "p8lin": {"patch_size": 8, "patchify": "linear"},
    "p4conv-v": {"prediction": "v"},
    "p8conv-v": {"patch_size": 8, "prediction": "v"},
    "p8conv-cap80": {"patch_size": 8, "caption_first_fraction": 0.8},
    "p8conv-d192": {"patch_size": 8, "d_model": 192, "n_layers": 6, "n_heads": 6},
    "p4conv-d192": {"d_model": 192, "n_layers": 6, "n_heads": 6},
    "gpu": None,  # the gpu recipe as it is
}


def run_variant(name: str, steps: int, device: str, dtype: torch.dtype, eval_steps: int) -> tuple[dict, dict]:
    base = RECIPES["gpu"] if VARIANTS[name] is None else replace(RECIPES["default"], **VARIANTS[name])
    recipe = replace(base, name=name, steps=steps, checkpoint_seconds=1e9)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as work:
        model, tok, history = train(recipe, Path(work), device=device, dtype=dtype, progress=False)
    seconds = time.time() - t0
    train_scenes, held = shapes.split_scenes(recipe.held_out, recipe.seed)
    result = evaluate(TransfusionSampler(model.eval(), tok, device=device), train_scenes, held,
                      EvalSettings(steps=eval_steps))
    row = {"variant": name, "overrides": VARIANTS[name], "recipe": asdict(recipe),
           "params": sum(p.numel() for p in model.parameters()), "steps": steps, "train_seconds": round(seconds, 1),
           "lm_loss": float(np.mean(history["lm"][-50:])), "diffusion_loss": float(np.mean(history["diffusion"][-50:])),
           "curve": {k: history[k][:: max(1, steps // 200)] for k in ("step", "lm", "diffusion")}}
    for split in ("seen", "held_out"):
        s = result["splits"][split]
        row[split] = {**{f"t2i_{k}": v for k, v in s["text_to_image"].items()},
                      "caption_exact": s["caption"]["exact_match"], "caption_words": s["caption"]["word_accuracy"]}
    return row, result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="VARIANT:STEPS, variants: " + ", ".join(VARIANTS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--eval-steps", type=int, default=20)
    ap.add_argument("--time-limit", type=float, default=1e9, help="start no variant after this many seconds")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = [(r.split(":")[0], int(r.split(":")[1])) for r in args.runs]
    for name, _ in runs:
        if name not in VARIANTS:
            ap.error(f"unknown variant {name!r}; choose from {sorted(VARIANTS)}")
    rows, started = [], time.time()
    header = (f"{'variant':14s} {'params':>7s} {'steps':>6s} {'sec':>6s} | seen: col shp pos all cap"
              " | held: col shp pos all cap")
    print(header, flush=True)
    for name, steps in runs:
        if time.time() - started > args.time_limit:
            print(f"{name}: skipped (time limit)", flush=True)
            continue
        try:
            row, result = run_variant(name, steps, args.device, getattr(torch, args.dtype), args.eval_steps)
        except Exception as err:  # one broken variant must not lose the others' numbers
            print(f"{name}: failed: {err!r}", flush=True)
            continue
        rows.append(row)
        images, labels = result["grid"]
        shapes.image_grid(images, labels, columns=8, scale=2).save(args.out / f"samples-{name}.png")
        cells = " ".join(f"{row['seen'][k]:.2f}" for k in ("t2i_color", "t2i_shape", "t2i_position", "t2i_all",
                                                           "caption_exact"))
        held = " ".join(f"{row['held_out'][k]:.2f}" for k in ("t2i_color", "t2i_shape", "t2i_position", "t2i_all",
                                                              "caption_exact"))
        print(f"{name:14s} {row['params'] / 1e6:6.2f}M {steps:6d} {row['train_seconds']:6.0f} | {cells} | {held}",
              flush=True)
        (args.out / "results.json").write_text(json.dumps({"device": args.device, "dtype": args.dtype,
                                                           "gpu": torch.cuda.get_device_name() if
                                                           torch.cuda.is_available() else None, "rows": rows},
                                                          indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
