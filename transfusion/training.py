"""Training examples, sequence layouts and the Transfusion loss L = L_LM + lambda * L_diffusion.

Two layouts per (caption, image) pair, as in the paper:
- caption first (text -> image): <bos> caption <boi> [patches] <eoi> <eos>; the caption is dropped (replaced by
  nothing) for a fraction of examples so that the sampler can use classifier-free guidance;
- image first (image -> text): <bos> <boi> [patches] <eoi> caption <eos>, with the image's noise capped (paper: t <= 500
  of 1000) so that captions are learned from mostly clean images.

Noise comes from diffusers' FlowMatchEulerDiscreteScheduler (rectified flow: x_t = sigma * eps + (1 - sigma) * x0);
the sampler steps the same scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from prunefusion.transfusion.model import Transfusion, attention_mask, images_to_tensor

IGNORE = -100


def make_scheduler(num_train_timesteps: int = 1000):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=1.0)


@dataclass
class Layout:
    """A padded batch of mixed sequences, one image per sequence (tensors [B, S] unless noted)."""

    ids: torch.Tensor  # token ids; <pad> at patch and padding positions
    text_positions: torch.Tensor
    is_patch: torch.Tensor
    valid: torch.Tensor
    image_id: torch.Tensor  # 1 on the image's patches, 0 elsewhere
    targets: torch.Tensor  # next text token for text positions followed by text, else IGNORE


def layout(captions: list[list[int]], caption_first: list[bool], num_patches: int, tok) -> Layout:
    """Build the token/patch layout for each example (captions already dropped where wanted)."""
    rows = []
    for cap, first in zip(captions, caption_first, strict=True):
        if first:
            pre, post = [tok.bos_id, *cap, tok.boi_id], [tok.eoi_id, tok.eos_id]
        else:
            pre, post = [tok.bos_id, tok.boi_id], [tok.eoi_id, *cap, tok.eos_id]
        rows.append((pre, post))
    s = max(len(pre) + num_patches + len(post) for pre, post in rows)
    b = len(rows)
    ids = torch.full((b, s), tok.pad_id, dtype=torch.long)
    text_pos = torch.zeros((b, s), dtype=torch.long)
    is_patch = torch.zeros((b, s), dtype=torch.bool)
    valid = torch.zeros((b, s), dtype=torch.bool)
    targets = torch.full((b, s), IGNORE, dtype=torch.long)
    for r, (pre, post) in enumerate(rows):
        n_pre, start_post = len(pre), len(pre) + num_patches
        end = start_post + len(post)
        ids[r, :n_pre], ids[r, start_post:end] = torch.tensor(pre), torch.tensor(post)
        is_patch[r, n_pre:start_post] = True
        valid[r, :end] = True
        text_pos[r, :n_pre] = torch.arange(n_pre)
        text_pos[r, start_post:end] = torch.arange(n_pre, n_pre + len(post))
        # next-token targets inside each text run (the last patch does not predict <eoi>: the sampler inserts it)
        targets[r, : n_pre - 1] = torch.tensor(pre[1:])
        targets[r, start_post:end - 1] = torch.tensor(post[1:])
    return Layout(ids, text_pos, is_patch, valid, is_patch.long(), targets)


def sample_noise_levels(scheduler, batch: int, max_sigma: torch.Tensor, generator: torch.Generator):
    """Per example a training timestep of the scheduler whose sigma <= max_sigma[i] -> (timesteps, sigmas)."""
    sigmas = scheduler.sigmas[:-1] if len(scheduler.sigmas) > len(scheduler.timesteps) else scheduler.sigmas
    allowed = sigmas[None, :] <= max_sigma[:, None] + 1e-6  # [B, T]
    weights = allowed.float()
    index = torch.multinomial(weights, 1, generator=generator).squeeze(1)
    return scheduler.timesteps[index], sigmas[index]


def add_noise(images: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """FlowMatchEulerDiscreteScheduler.scale_noise with per-example sigmas and no per-timestep lookups (a test
    checks it against the scheduler)."""
    s = sigmas.view(-1, *([1] * (images.dim() - 1)))
    return s * noise + (1.0 - s) * images


def transfusion_loss(model: Transfusion, batch: Layout, images: torch.Tensor, scheduler, *, diffusion_weight: float,
                     max_sigma: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """images: clean [B, C, H, W] in [-1, 1]. Returns {"loss", "lm", "diffusion"}."""
    device = images.device
    b = images.shape[0]
    _, sigmas = sample_noise_levels(scheduler, b, max_sigma.cpu(), generator)
    noise = torch.randn(images.shape, generator=generator).to(device=device, dtype=images.dtype)
    sigmas = sigmas.to(device=device, dtype=images.dtype)
    noisy = add_noise(images, noise, sigmas)
    batch = Layout(*(t.to(device) for t in vars(batch).values()))
    x = model.embed_text(batch.ids, batch.text_positions)
    patches = model.embed_patches(noisy, sigmas)
    x = x.masked_scatter(batch.is_patch[..., None], patches.to(x.dtype))
    hidden, _ = model.transformer(x, attention_mask(batch.valid, batch.image_id))
    lm = F.cross_entropy(model.lm_logits(hidden).flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE)
    patch_hidden = hidden[batch.is_patch].view(b, -1, hidden.shape[-1])
    prediction = model.image_prediction(patch_hidden, noisy)
    target = images if model.config.prediction == "x0" else noise - images
    diffusion = F.mse_loss(prediction.float(), target.float())
    return {"loss": lm + diffusion_weight * diffusion, "lm": lm.detach(), "diffusion": diffusion.detach()}


class RenderBank:
    """Jittered renders made once (per_scene per scene), so that a training step samples images instead of drawing
    them: drawing cost ~25 ms per batch of 32 on this CPU, as much as a small model's step."""

    def __init__(self, scenes, per_scene: int, image_size: int, seed: int) -> None:
        from prunefusion.transfusion.shapes import render

        rng = np.random.default_rng(seed)
        self.scenes = list(scenes)
        self.images = np.stack([np.stack([render(s, image_size, rng) for _ in range(per_scene)]) for s in self.scenes])

    def sample(self, batch_size: int, rng: np.random.Generator):
        which = rng.integers(len(self.scenes), size=batch_size)
        variant = rng.integers(self.images.shape[1], size=batch_size)
        return [self.scenes[i] for i in which], self.images[which, variant]


def training_batch(bank: RenderBank, batch_size: int, tok, rng: np.random.Generator, *,
                   caption_first_fraction: float, caption_dropout: float, image_first_max_sigma: float,
                   num_patches: int):
    """Random scenes -> (Layout, clean images [B, C, H, W], max sigma per example [B])."""
    chosen, pixels = bank.sample(batch_size, rng)
    first = rng.random(batch_size) < caption_first_fraction
    dropped = rng.random(batch_size) < caption_dropout
    captions = [[] if (f and d) else tok.encode(s.caption()) for s, f, d in zip(chosen, first, dropped, strict=True)]
    lay = layout(captions, first.tolist(), num_patches, tok)
    max_sigma = torch.tensor(np.where(first, 1.0, image_first_max_sigma), dtype=torch.float32)
    return lay, images_to_tensor(pixels), max_sigma
