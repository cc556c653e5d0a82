"""`prunefusion models build transfusion`: train the shapes-world Transfusion model and save it as a directory
(config.json, model.safetensors, vocab.json, manifest.json, report.md, loss curve and sample grids).

Work happens in OUT.partial: a checkpoint is written every `checkpoint_seconds`, a rerun resumes from it (same
recipe), and only the finished directory is renamed to OUT. Device and dtype are options; the recipe is the same on
a GPU.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from prunefusion.atomic import partial_dir, publish, replace_atomically
from prunefusion.checkpoints import load_resume_state
from prunefusion.transfusion import shapes
from prunefusion.transfusion.model import Transfusion, TransfusionConfig
from prunefusion.transfusion.tokenizer import WordTokenizer
from prunefusion.transfusion.training import RenderBank, make_scheduler, training_batch, transfusion_loss


@dataclass(frozen=True)
class TransfusionRecipe:
    name: str
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    patch_size: int = 4
    patchify: str = "conv"
    prediction: str = "x0"
    steps: int = 3000
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    diffusion_weight: float = 5.0  # the paper's lambda
    caption_first_fraction: float = 0.5  # the paper uses 0.8 at 7B; captions need more of the budget at our scale
    caption_dropout: float = 0.1
    image_first_max_sigma: float = 0.5  # paper: t <= 500 of 1000 for image-first examples
    held_out: int = 16
    renders_per_scene: int = 64  # jittered renders drawn once per training scene
    seed: int = 0
    eval_steps: int = 20  # sampling steps for the final evaluation
    eval_every: int = 1000  # a quick accuracy check during training (the learning curve); 0: none
    checkpoint_seconds: float = 60.0


RECIPES = {
    # Chosen by benchmarks/transfusion_recipes.py (RESULTS.md): patch 8 with conv stems reached every goal at a
    # 10-minute CPU budget; ~81 ms/step on 2 CPU cores -> ~11 minutes.
    "default": TransfusionRecipe("default", patch_size=8, steps=8000),
    "pico": TransfusionRecipe("pico", d_model=32, n_layers=2, n_heads=2, patch_size=8, steps=20, batch_size=8,
                              warmup_steps=2, eval_steps=4, eval_every=10),
    # patch 4, 15M parameters: 4000 steps reached 100% on every metric in 2.7 minutes on an H100
    "gpu": TransfusionRecipe("gpu", d_model=384, n_layers=8, n_heads=6, steps=4000, batch_size=128,
                             learning_rate=5e-4, warmup_steps=500),
}


def model_config(recipe: TransfusionRecipe, tok: WordTokenizer) -> TransfusionConfig:
    return TransfusionConfig(vocab_size=len(tok), d_model=recipe.d_model, n_layers=recipe.n_layers,
                             n_heads=recipe.n_heads, patch_size=recipe.patch_size, patchify=recipe.patchify,
                             prediction=recipe.prediction, image_size=shapes.IMAGE_SIZE)


def _lr_factor(step: int, recipe: TransfusionRecipe) -> float:
    if step < recipe.warmup_steps:
        return (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    # a Python float: the optimizer's param_groups keep it, and a numpy scalar there fails weights_only loading
    return float(0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * min(1.0, progress))))


def train(recipe: TransfusionRecipe, work: Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
          progress: bool = True):
    """Train (resuming from work/checkpoint.pt when it is for this recipe) -> (model, tokenizer, history)."""
    tok = WordTokenizer(shapes.caption_words())
    train_scenes, held_scenes = shapes.split_scenes(recipe.held_out, recipe.seed)
    bank = RenderBank(train_scenes, recipe.renders_per_scene, shapes.IMAGE_SIZE, recipe.seed)
    torch.manual_seed(recipe.seed)
    model = Transfusion(model_config(recipe, tok)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, betas=(0.9, 0.99), weight_decay=0.01)
    scheduler = make_scheduler()
    rng = np.random.default_rng(recipe.seed)
    generator = torch.Generator().manual_seed(recipe.seed)
    # clock: [step, training seconds]; evals: quick accuracy checks (their time is not training time)
    history: dict = {"step": [], "loss": [], "lm": [], "diffusion": [], "clock": [], "evals": []}
    start, elapsed = 0, 0.0
    ckpt = work / "checkpoint.pt"
    if ckpt.is_file():
        state = load_resume_state(ckpt, map_location=device, remedy="Delete it to train from the start")
        if state["recipe"] == asdict(recipe):
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            rng.bit_generator.state = state["numpy_rng"]
            generator.set_state(state["torch_rng"])
            history, start, elapsed = state["history"], state["step"], state["seconds"]
    autocast = torch.autocast(device_type=torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32)
    t0, last_save = time.time() - elapsed, time.time()
    pending: list[torch.Tensor] = []
    if torch.device(device).type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls
    bar = tqdm(range(start, recipe.steps), initial=start, total=recipe.steps, desc=f"train transfusion {recipe.name}",
               unit="step", disable=not progress)
    for step in bar:
        model.train()
        lay, images, max_sigma = training_batch(
            bank, recipe.batch_size, tok, rng, caption_first_fraction=recipe.caption_first_fraction,
            caption_dropout=recipe.caption_dropout, image_first_max_sigma=recipe.image_first_max_sigma,
            num_patches=model.config.num_patches)
        for group in optimizer.param_groups:
            group["lr"] = recipe.learning_rate * _lr_factor(step, recipe)
        with autocast:
            losses = transfusion_loss(model, lay, images.to(device), scheduler,
                                      diffusion_weight=recipe.diffusion_weight, max_sigma=max_sigma,
                                      generator=generator)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        pending.append(torch.stack([losses["loss"].detach(), losses["lm"], losses["diffusion"]]))
        if len(pending) == 25 or step + 1 == recipe.steps:  # one device sync per 25 steps, not three per step
            values = torch.stack(pending).float().cpu().tolist()
            for i, (total, lm, diffusion) in enumerate(values):
                history["loss"].append(total)
                history["lm"].append(lm)
                history["diffusion"].append(diffusion)
                history["step"].append(step + 2 - len(values) + i)
            history["clock"].append([step + 1, round(time.time() - t0, 2)])
            pending.clear()
            bar.set_postfix(lm=f"{history['lm'][-1]:.3f}", diffusion=f"{history['diffusion'][-1]:.4f}")
        if recipe.eval_every and (step + 1) % recipe.eval_every == 0:
            started_eval = time.time()
            history["evals"].append({"step": step + 1, "minutes": round((started_eval - t0) / 60, 2),
                                     **quick_accuracy(model, tok, train_scenes, held_scenes, device)})
            t0 += time.time() - started_eval
            model.train()
        if not pending and time.time() - last_save > recipe.checkpoint_seconds and step + 1 < recipe.steps:
            _save_checkpoint(ckpt, recipe, model, optimizer, rng, generator, history, step + 1, time.time() - t0)
            last_save = time.time()
    return model, tok, history


def quick_accuracy(model: Transfusion, tok: WordTokenizer, train_scenes, held_scenes, device: str) -> dict:
    """A small, fixed evaluation for the learning curve: 16 seen and the held-out scenes, 10 Euler steps."""
    from prunefusion.transfusion.evaluate import EvalSettings, caption_accuracy, seen_subset, text_to_image_accuracy
    from prunefusion.transfusion.sampling import TransfusionSampler

    sampler = TransfusionSampler(model, tok, device=device, channels_last=False)  # leave the trained layout alone
    settings = EvalSettings(steps=10, max_seen_scenes=16)
    seen = seen_subset(train_scenes, settings.max_seen_scenes, settings.seed)  # chosen as the evaluation chooses
    out = {}
    for name, scenes in (("seen", seen), ("held_out", held_scenes)):
        t2i, _, _ = text_to_image_accuracy(sampler, scenes, settings)
        caption, _ = caption_accuracy(sampler, scenes, settings)
        out[name] = {"text_to_image_all": t2i["all"], "caption_exact": caption["exact_match"]}
    return out


def _save_checkpoint(path: Path, recipe, model, optimizer, rng, generator, history, step: int, seconds: float):
    """Only what weights_only loading accepts: tensors, dicts, lists, str, int, float (the numpy RNG state is a dict
    of Python ints)."""
    state = {"recipe": asdict(recipe), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "numpy_rng": rng.bit_generator.state, "torch_rng": generator.get_state(), "history": history,
             "step": step, "seconds": seconds}
    replace_atomically(path, lambda tmp: torch.save(state, tmp))


def save_model(model: Transfusion, tok: WordTokenizer, directory: Path) -> None:
    """config.json + model.safetensors + vocab.json + scheduler/ (what TransfusionSampler.load reads)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save(directory)
    tok.save(directory)
    make_scheduler().save_config(directory / "scheduler")
    save_file({k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()},
              directory / "model.safetensors")


def build_transfusion(recipe_name: str, out: Path, *, steps: int | None = None, seed: int | None = None,
                      device: str = "cpu", dtype: str = "float32", force: bool = False, evaluate_model: bool = True,
                      progress: bool = True) -> dict:
    from prunefusion.transfusion.evaluate import EvalSettings, evaluate
    from prunefusion.transfusion.report import write_report
    from prunefusion.transfusion.sampling import TransfusionSampler

    if recipe_name not in RECIPES:
        raise ValueError(f"unknown Transfusion recipe {recipe_name!r}; choose one of {sorted(RECIPES)}")
    recipe = replace(RECIPES[recipe_name], **({"steps": steps} if steps else {}),
                     **({"seed": seed} if seed is not None else {}))
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to rebuild it")
    work = partial_dir(out)  # resumed: train() continues from the checkpoint a killed run left there
    work.mkdir(parents=True, exist_ok=True)
    torch_dtype = getattr(torch, dtype)
    started = time.time()
    model, tok, history = train(recipe, work, device=device, dtype=torch_dtype, progress=progress)
    save_model(model.eval(), tok, work)
    train_scenes, held_scenes = shapes.split_scenes(recipe.held_out, recipe.seed)
    manifest = {
        "kind": "prunefusion.transfusion",
        "recipe": asdict(recipe),
        "config": asdict(model.config),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "data": {"world": "shapes", "image_size": shapes.IMAGE_SIZE, "shapes": list(shapes.SHAPES),
                 "colors": list(shapes.COLORS), "positions": list(shapes.POSITIONS),
                 "held_out_scenes": [s.caption() for s in held_scenes], "train_scenes": len(train_scenes)},
        "training": {"steps": recipe.steps, "seconds": history["clock"][-1][1] if history["clock"] else 0.0,
                     "device": device, "dtype": dtype, "torch_threads": torch.get_num_threads(),
                     "final_lm_loss": float(np.mean(history["lm"][-50:])),
                     "final_diffusion_loss": float(np.mean(history["diffusion"][-50:]))},
        "versions": {"torch": torch.__version__, "diffusers": __import__("diffusers").__version__},
    }
    if evaluate_model:
        sampler = TransfusionSampler(model, tok, device=device)
        result = evaluate(sampler, train_scenes, held_scenes, EvalSettings(steps=recipe.eval_steps))
        manifest["evaluation"] = {k: v for k, v in result.items() if k != "grid"}
        write_report(work, manifest, history, result)
    manifest["build_seconds"] = round(time.time() - started, 1)
    (work / "history.json").write_text(json.dumps(history) + "\n")
    (work / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (work / "checkpoint.pt").unlink(missing_ok=True)
    publish(work, out)
    return manifest
