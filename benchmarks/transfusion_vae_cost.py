"""Pixels or a VAE for the shapes world? What a small diffusers AutoencoderKL would cost here, beside the pixel
model's own training step, measured in one run.

At 32x32, pixel patches of 8 give 16 tokens per image; a VAE with 4x downsampling (32x32x3 -> 8x8x4) at patch 2
also gives 16 tokens, so the transformer's cost is the same either way. The VAE adds: its own training (before
Transfusion training can start), an encode per training image (unless latents are cached), and a decode per
generated image. This prints those costs as multiples of one Transfusion training step.

With --quality-steps N it also trains the VAE for N steps and measures what its reconstruction costs in quality:
PSNR, and how often the pixel checker still reads the scene's shape, colour and position back from the
reconstruction of a fresh render of every scene (beside the same read-back from the renders themselves).

    python benchmarks/transfusion_vae_cost.py [--quality-steps 1500]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from _server import median_seconds


def reconstruction_quality(vae, scenes, rng: np.random.Generator) -> dict:
    """PSNR and checker read-back of VAE reconstructions (encode -> mode -> decode) of one render per scene."""
    from prunefusion.transfusion import shapes
    from prunefusion.transfusion.model import images_to_tensor, tensor_to_images

    renders = np.stack([shapes.render(scene, shapes.IMAGE_SIZE, rng) for scene in scenes])
    with torch.no_grad():
        recon = tensor_to_images(vae.decode(vae.encode(images_to_tensor(renders)).latent_dist.mode()).sample)
    mse = ((recon.astype(np.float64) - renders.astype(np.float64)) ** 2).mean(axis=(1, 2, 3))
    psnr = float(np.mean(10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-9))))

    def read_back(images):
        hits = [shapes.attribute_matches(scene, shapes.read_scene(image))
                for scene, image in zip(scenes, images, strict=True)]
        return {name: float(np.mean([h[name] for h in hits])) for name in ("shape", "color", "position")} | {
            "all": float(np.mean([all(h.values()) for h in hits]))}

    return {"psnr_db": psnr, "renders": read_back(renders), "reconstructions": read_back(recon)}


def main() -> int:
    from diffusers import AutoencoderKL

    from prunefusion.transfusion import shapes
    from prunefusion.transfusion.build import RECIPES, model_config
    from prunefusion.transfusion.model import Transfusion, images_to_tensor
    from prunefusion.transfusion.tokenizer import WordTokenizer
    from prunefusion.transfusion.training import RenderBank, make_scheduler, training_batch, transfusion_loss

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quality-steps", type=int, default=0, help="also train the VAE this long and measure "
                        "its reconstructions (0: costs only)")
    args = parser.parse_args()
    torch.manual_seed(0)
    batch = 32
    tok = WordTokenizer(shapes.caption_words())
    recipe = RECIPES["default"]
    model = Transfusion(model_config(recipe, tok))
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
    train, _ = shapes.split_scenes()
    bank = RenderBank(train, 4, shapes.IMAGE_SIZE, 0)
    rng, gen, scheduler = np.random.default_rng(0), torch.Generator().manual_seed(0), make_scheduler()

    def transfusion_step():
        lay, images, max_sigma = training_batch(bank, batch, tok, rng, caption_first_fraction=0.5,
                                                caption_dropout=0.1, image_first_max_sigma=0.5,
                                                num_patches=model.config.num_patches)
        loss = transfusion_loss(model, lay, images, scheduler, diffusion_weight=5.0, max_sigma=max_sigma,
                                generator=gen)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64, 64),
                        layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=32)
    vae_optimizer = torch.optim.AdamW(vae.parameters(), 1e-3)
    pixels = images_to_tensor(bank.sample(batch, rng)[1])

    def vae_train_step():
        posterior = vae.encode(pixels).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = torch.nn.functional.mse_loss(recon, pixels) + 1e-6 * posterior.kl().mean()
        loss.backward()
        vae_optimizer.step()
        vae_optimizer.zero_grad()

    with torch.no_grad():
        latent_shape = tuple(vae.encode(pixels[:1]).latent_dist.mode().shape[1:])

    @torch.no_grad()
    def encode():
        return vae.encode(pixels).latent_dist.mode()

    @torch.no_grad()
    def decode4():
        return vae.decode(torch.randn(4, *latent_shape)).sample

    step = median_seconds(transfusion_step, 5)
    rows = {"Transfusion training step (batch 32, the baseline)": step,
            "VAE training step (batch 32)": median_seconds(vae_train_step, 5),
            "VAE encode (batch 32, per Transfusion step without cached latents)": median_seconds(encode, 5),
            "VAE decode (4 generated images)": median_seconds(decode4, 5)}
    print(f"VAE: {sum(p.numel() for p in vae.parameters()):,} parameters, 32x32x3 -> {latent_shape}; "
          f"Transfusion: {sum(p.numel() for p in model.parameters()):,} parameters; torch threads "
          f"{torch.get_num_threads()}")
    for name, seconds in rows.items():
        print(f"{name:<72} {seconds * 1000:8.1f} ms  {seconds / step:5.2f}x the Transfusion step")
    if args.quality_steps:
        from tqdm import tqdm

        start = time.perf_counter()
        for _ in tqdm(range(args.quality_steps), desc="VAE training", unit="step"):
            pixels = images_to_tensor(bank.sample(batch, rng)[1])
            vae_train_step()
        seconds = time.perf_counter() - start
        vae.eval()
        quality = reconstruction_quality(vae, shapes.all_scenes(), np.random.default_rng(7))
        print(f"VAE trained {args.quality_steps} steps of batch {batch} in {seconds / 60:.1f} min "
              f"({seconds / step:.0f} Transfusion steps' time); one fresh render of each of "
              f"{len(shapes.all_scenes())} scenes, reconstructed: PSNR {quality['psnr_db']:.1f} dB")
        for name in ("shape", "color", "position", "all"):
            print(f"  checker reads {name:<9} renders {quality['renders'][name]:6.1%}   "
                  f"reconstructions {quality['reconstructions'][name]:6.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
