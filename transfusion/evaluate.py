"""Does it work? Text -> image attributes read back from pixels, and captions, on seen and held-out combinations."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from prunefusion.transfusion import shapes
from prunefusion.transfusion.sampling import ImageRequest, TransfusionSampler

ATTRIBUTES = ("color", "shape", "position")


@dataclass(frozen=True)
class EvalSettings:
    steps: int = 20
    guidance_scale: float = 3.0
    images_per_scene: int = 1
    max_seen_scenes: int = 48  # a seeded subset of the training combinations (all held-out ones are used)
    batch_size: int = 32
    seed: int = 1234


def text_to_image_accuracy(sampler: TransfusionSampler, scenes: list[shapes.Scene], settings: EvalSettings):
    """Generate each scene's caption, read the scene back with the pixel checker -> (accuracies, images, reads)."""
    requests = [ImageRequest(s.caption(), settings.steps, settings.guidance_scale, settings.seed + 7919 * i + j)
                for i, s in enumerate(scenes) for j in range(settings.images_per_scene)]
    expected = [s for s in scenes for _ in range(settings.images_per_scene)]
    images: list[np.ndarray] = []
    for k in range(0, len(requests), settings.batch_size):
        images += sampler.generate_images(requests[k:k + settings.batch_size])
    reads = [shapes.read_scene(im) for im in images]
    hits = [shapes.attribute_matches(e, r) for e, r in zip(expected, reads, strict=True)]
    acc = {a: float(np.mean([h[a] for h in hits])) for a in ATTRIBUTES}
    acc["all"] = float(np.mean([all(h.values()) for h in hits]))
    return acc, images, reads


def caption_accuracy(sampler: TransfusionSampler, scenes: list[shapes.Scene], settings: EvalSettings):
    """Caption jittered renders (images_per_scene per scene) -> exact-match rate, word accuracy (position by
    position) and the captions."""
    rng = np.random.default_rng(settings.seed)
    scenes = [s for s in scenes for _ in range(settings.images_per_scene)]  # a fresh jittered render each
    pixels = np.stack([shapes.render(s, sampler.config.image_size, rng) for s in scenes])
    captions: list[str] = []
    for k in range(0, len(scenes), settings.batch_size):
        captions += sampler.caption(pixels[k:k + settings.batch_size])
    exact, word_hits, word_total = 0, 0, 0
    for s, got in zip(scenes, captions, strict=True):
        want, have = s.caption().split(), got.split()
        exact += want == have
        word_hits += sum(w == h for w, h in zip(want, have, strict=False))
        word_total += max(len(want), len(have))
    return {"exact_match": exact / len(scenes), "word_accuracy": word_hits / max(word_total, 1)}, captions


def seen_subset(train: list[shapes.Scene], count: int, seed: int) -> list[shapes.Scene]:
    """A seeded subset of the training combinations, in training order (the evaluation and the learning curve)."""
    picks = np.random.default_rng(seed).choice(len(train), min(count, len(train)), replace=False)
    return [train[i] for i in sorted(picks)]


def evaluate(sampler: TransfusionSampler, train: list[shapes.Scene], held_out: list[shapes.Scene],
             settings: EvalSettings | None = None) -> dict:
    """The report's numbers: per split, text -> image attribute accuracy and caption accuracy; plus grid images."""
    settings = settings or EvalSettings()
    seen = seen_subset(train, settings.max_seen_scenes, settings.seed)
    result: dict = {"settings": vars(settings), "splits": {}}
    grid_images, grid_labels = [], []
    for name, scenes in (("seen", seen), ("held_out", held_out)):
        t2i, images, reads = text_to_image_accuracy(sampler, scenes, settings)
        i2t, captions = caption_accuracy(sampler, scenes, settings)
        result["splits"][name] = {"scenes": len(scenes), "text_to_image": t2i, "caption": i2t,
                                  "examples": [{"prompt": s.caption(), "read_back": r.caption() if r else None,
                                                "caption_of_render": c}
                                               for s, r, c in list(zip(scenes, reads[::settings.images_per_scene],
                                                                       captions[::settings.images_per_scene],
                                                                       strict=False))[:8]]}
        step = settings.images_per_scene
        grid_images += images[::step][:16]
        grid_labels += [("" if r and r == s else "x ") + s.caption().replace("a ", "", 1)
                        for s, r in list(zip(scenes, reads[::step], strict=False))[:16]]
    result["grid"] = (grid_images, grid_labels)
    return result


def goals_table(result: dict) -> list[tuple[str, str, str, str]]:
    """(metric, seen, held-out, goal) rows for reports."""
    goals = {"color": 0.95, "shape": 0.90, "position": 0.90}
    rows = []
    s, h = result["splits"]["seen"], result["splits"]["held_out"]
    for a in (*ATTRIBUTES, "all"):
        rows.append((f"text->image {a}", f"{s['text_to_image'][a]:.1%}", f"{h['text_to_image'][a]:.1%}",
                     f">= {goals[a]:.0%}" if a in goals else ""))
    rows.append(("caption exact match", f"{s['caption']['exact_match']:.1%}", f"{h['caption']['exact_match']:.1%}",
                 ">= 90%"))
    rows.append(("caption word accuracy", f"{s['caption']['word_accuracy']:.1%}",
                 f"{h['caption']['word_accuracy']:.1%}", ""))
    return rows
