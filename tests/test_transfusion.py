"""The Transfusion model: the attention mask, the loss, and the samplers against their slow references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prunefusion.transfusion import shapes
from prunefusion.transfusion.model import Transfusion, TransfusionConfig, attention_mask
from prunefusion.transfusion.sampling import ImageRequest, TransfusionSampler
from prunefusion.transfusion.tokenizer import WordTokenizer
from prunefusion.transfusion.training import (
    RenderBank,
    add_noise,
    layout,
    make_scheduler,
    training_batch,
    transfusion_loss,
)

TOK = WordTokenizer(shapes.caption_words())


def pico_model(seed: int = 0, **overrides) -> Transfusion:
    torch.manual_seed(seed)
    config = dict(vocab_size=len(TOK), d_model=32, n_layers=2, n_heads=2, patch_size=8)
    return Transfusion(TransfusionConfig(**{**config, **overrides})).eval()


def test_mask_text_never_sees_the_future_and_patches_see_their_whole_image():
    cap = TOK.encode("a red circle at the top")
    lay = layout([cap, cap], [True, False], num_patches=4, tok=TOK)
    mask = attention_mask(lay.valid, lay.image_id)
    for row in range(2):
        patch_pos = lay.is_patch[row].nonzero().flatten().tolist()
        n = int(lay.valid[row].sum())
        for i in range(n):
            for j in range(n):
                both_patches = i in patch_pos and j in patch_pos
                assert bool(mask[row, i, j]) == (j <= i or both_patches), (row, i, j)
        # padding is never attended to (except a padded row attending to itself)
        assert not mask[row, :n, n:].any()


def test_mask_changes_the_output_the_way_it_says():
    """Changing a later text token leaves earlier outputs alone; changing the last patch changes the first patch."""
    model = pico_model()
    cap = TOK.encode("a red circle at the top")
    lay = layout([cap], [True], num_patches=16, tok=TOK)
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(1, 3, 32, 32, generator=gen) * 2 - 1

    def hidden(ids, imgs):
        x = model.embed_text(ids, lay.text_positions)
        x = x.masked_scatter(lay.is_patch[..., None], model.embed_patches(imgs, torch.tensor([0.5])))
        return model.transformer(x, attention_mask(lay.valid, lay.image_id))[0]

    base = hidden(lay.ids, images)
    ids2 = lay.ids.clone()
    ids2[0, 3] = TOK.ids["blue"]  # a caption word after position 2
    changed = hidden(ids2, images)
    torch.testing.assert_close(changed[0, :3], base[0, :3])
    assert not torch.allclose(changed[0, 3], base[0, 3])
    images2 = images.clone()
    images2[..., 24:, 24:] = -images2[..., 24:, 24:]  # only the last patch
    first_patch = int(lay.is_patch[0].nonzero()[0])
    assert not torch.allclose(hidden(lay.ids, images2)[0, first_patch], base[0, first_patch])


def test_training_noise_is_the_schedulers_formula():
    scheduler = make_scheduler()
    x0, eps = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    t = scheduler.timesteps[[100, 700]]
    torch.testing.assert_close(add_noise(x0, eps, scheduler.sigmas[[100, 700]]), scheduler.scale_noise(x0, t, eps))


@pytest.mark.slow
def test_loss_falls_on_a_pico_run():
    model = pico_model().train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    train, _ = shapes.split_scenes()
    bank = RenderBank(train, 4, 32, seed=0)
    rng, gen, sched = np.random.default_rng(0), torch.Generator().manual_seed(0), make_scheduler()
    history = []
    for _ in range(60):
        lay, images, max_sigma = training_batch(bank, 16, TOK, rng, caption_first_fraction=0.5, caption_dropout=0.1,
                                                image_first_max_sigma=0.5, num_patches=16)
        losses = transfusion_loss(model, lay, images, sched, diffusion_weight=5.0, max_sigma=max_sigma, generator=gen)
        losses["loss"].backward()
        opt.step()
        opt.zero_grad()
        history.append((float(losses["lm"]), float(losses["diffusion"])))
    first, last = np.mean(history[:5], axis=0), np.mean(history[-5:], axis=0)
    assert last[0] < 0.6 * first[0], (first, last)  # text loss
    assert last[1] < 0.8 * first[1], (first, last)  # diffusion loss


@pytest.mark.parametrize("overrides", [{}, {"patchify": "linear", "prediction": "v"}])
def test_same_seed_same_image_and_cached_prefix_equals_recomputing_it(overrides):
    sampler = TransfusionSampler(pico_model(**overrides), TOK)
    req = ImageRequest("a red circle at the top left", steps=4, guidance_scale=3.0, seed=7)
    a, b = sampler.generate_images([req])[0], sampler.generate_images([req])[0]
    np.testing.assert_array_equal(a, b)
    other = sampler.generate_images([ImageRequest(req.prompt, 4, 3.0, seed=8)])[0]
    assert (a != other).any()  # an untrained x0 model barely depends on the noise, but it does
    recomputed = sampler.generate_images([req], use_cache=False)[0]
    assert np.abs(a.astype(int) - recomputed).max() <= 1


def test_batched_images_equal_unbatched_ones_for_the_same_seeds():
    sampler = TransfusionSampler(pico_model(), TOK)
    requests = [ImageRequest("a red circle at the top left", 4, 3.0, 1),
                ImageRequest("a blue square", 4, 1.0, 2),  # no guidance, shorter prompt (left padding)
                ImageRequest("a green triangle in the center", 3, 5.0, 3)]  # fewer steps
    batched = sampler.generate_images(requests)
    for req, image in zip(requests, batched, strict=True):
        alone = sampler.generate_images([req])[0]
        assert np.abs(alone.astype(int) - image).max() <= 1, req


def test_captions_batched_equal_unbatched_and_interleaved_yields_parts():
    sampler = TransfusionSampler(pico_model(), TOK)
    rng = np.random.default_rng(0)
    images = np.stack([shapes.render(s, 32, rng) for s in shapes.all_scenes()[:3]])
    batched = sampler.caption(images, max_tokens=6)
    assert batched == [sampler.caption(images[i:i + 1], max_tokens=6)[0] for i in range(3)]
    parts = list(sampler.interleaved("a red", max_tokens=5, steps=2))
    assert 1 <= len(parts) <= 5 + 2
    assert all(kind in ("text", "image") for kind, _ in parts)


def test_interleaved_images_at_boi_with_wrapping_seeds_and_no_special_tokens_as_text():
    model = pico_model()
    sampler = TransfusionSampler(model, TOK)
    bias = torch.zeros(len(TOK))
    lm_logits = model.lm_logits
    model.lm_logits = lambda hidden: lm_logits(hidden) + bias
    bias[TOK.boi_id] = 1e4  # <boi> at every choice: images up to max_images, then the end
    parts = list(sampler.interleaved("a red", max_tokens=5, max_images=2, steps=2, seed=2**64 - 1))
    assert [kind for kind, _ in parts] == ["image", "image"]  # the second image's seed wrapped to 0
    bias[TOK.boi_id] = 0
    bias[TOK.unk_id] = bias[TOK.pad_id] = 1e4  # what an untrained model may prefer: never said
    bias[TOK.ids["circle"]] = 5e3
    assert list(sampler.interleaved("a red", max_tokens=3, steps=2)) == [("text", "circle")] * 3
    assert list(sampler.interleaved("a red", max_tokens=3, steps=2, stopped=lambda: True)) == []


def test_a_stopped_request_leaves_the_batch_and_the_others_are_unchanged():
    sampler = TransfusionSampler(pico_model(), TOK)
    requests = [ImageRequest("a red circle at the top left", 5, 3.0, 1), ImageRequest("a blue square", 5, 3.0, 2)]
    rows: list[int] = []
    predict = sampler._predict
    sampler._predict = lambda noisy, *rest: rows.append(len(noisy)) or predict(noisy, *rest)
    first, second = sampler.generate_images(requests, stopped=lambda i: i == 1 and len(rows) >= 2)
    assert second is None and rows == [4, 4, 2, 2, 2]  # (prompt + null prompt) per request, then one request's
    alone = sampler.generate_images(requests[:1])[0]
    assert np.abs(alone.astype(int) - first).max() <= 1
    rows.clear()
    assert sampler.generate_images(requests, stopped=lambda i: True) == [None, None] and rows == []
