"""`prunefusion transfusion ...`: evaluate a Transfusion model and sample from it from the shell.

    prunefusion transfusion evaluate --model DIR --out runs/tf-eval [--steps 20 --guidance-scale 3]
    prunefusion transfusion sample --model DIR "a red circle on the left" -o out.png --seed 3
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _evaluate(args: argparse.Namespace) -> int:
    from prunefusion.transfusion import shapes
    from prunefusion.transfusion.evaluate import EvalSettings, evaluate, goals_table
    from prunefusion.transfusion.sampling import TransfusionSampler

    manifest_path = args.model / "manifest.json"
    recipe = json.loads(manifest_path.read_text())["recipe"] if manifest_path.is_file() else {}
    train, held = shapes.split_scenes(recipe.get("held_out", 16), recipe.get("seed", 0))
    sampler = TransfusionSampler.load(args.model, device=args.device)
    settings = EvalSettings(steps=args.steps, guidance_scale=args.guidance_scale,
                            images_per_scene=args.images_per_scene, max_seen_scenes=args.max_seen_scenes,
                            seed=args.seed)
    result = evaluate(sampler, train, held, settings)
    args.out.mkdir(parents=True, exist_ok=True)
    images, labels = result.pop("grid")
    shapes.image_grid(images, labels, columns=8, scale=3).save(args.out / "samples.png")
    (args.out / "evaluation.json").write_text(json.dumps({"model": str(args.model), **result}, indent=2) + "\n")
    print(f"{'metric':<24} {'seen':>7} {'held-out':>9}  goal")
    for metric, seen, held_out, goal in goals_table(result):
        print(f"{metric:<24} {seen:>7} {held_out:>9}  {goal}")
    print(f"wrote {args.out}/evaluation.json and samples.png (x = the checker disagrees with the prompt)")
    return 0


def _sample(args: argparse.Namespace) -> int:
    from prunefusion.images import encode_png
    from prunefusion.transfusion.sampling import ImageRequest, TransfusionSampler

    sampler = TransfusionSampler.load(args.model, device=args.device)
    unknown = sampler.tokenizer.unknown_words(args.prompt)
    if unknown:
        raise ValueError(f"words unknown to the model: {unknown}")
    (image,) = sampler.generate_images([ImageRequest(args.prompt, args.steps, args.guidance_scale, args.seed)])
    png, _, _ = encode_png(image, args.size)
    Path(args.output).write_bytes(png)
    print(f"wrote {args.output}; the model's own caption of it: {sampler.caption(image[None])[0]!r}")
    return 0


def register(sub) -> None:
    parser = sub.add_parser("transfusion", help="evaluate or sample a Transfusion model")
    tsub = parser.add_subparsers(dest="transfusion_command", required=True)
    ev = tsub.add_parser("evaluate", help="text->image attribute accuracy and caption accuracy, seen vs held-out "
                         "combinations, with a sample grid")
    ev.add_argument("--model", type=Path, required=True)
    ev.add_argument("--out", type=Path, required=True)
    ev.add_argument("--steps", type=int, default=20)
    ev.add_argument("--guidance-scale", type=float, default=3.0)
    ev.add_argument("--images-per-scene", type=int, default=1)
    ev.add_argument("--max-seen-scenes", type=int, default=48, help="a seeded subset of the training combinations")
    ev.add_argument("--seed", type=int, default=1234)
    ev.add_argument("--device", default="cpu")
    ev.set_defaults(func=_evaluate)
    sa = tsub.add_parser("sample", help="one image for a prompt, written as PNG")
    sa.add_argument("prompt")
    sa.add_argument("--model", type=Path, required=True)
    sa.add_argument("-o", "--output", default="out.png")
    sa.add_argument("--steps", type=int, default=20)
    sa.add_argument("--guidance-scale", type=float, default=3.0)
    sa.add_argument("--seed", type=int, default=0)
    sa.add_argument("--size", type=int, help="enlarge to this size (nearest neighbour)")
    sa.add_argument("--device", default="cpu")
    sa.set_defaults(func=_sample)
