"""The shapes world: captions, the held-out split, renders and the pixel checker that scores generated images."""

from __future__ import annotations

import numpy as np
import pytest

from prunefusion.transfusion import shapes

Scene = shapes.Scene


def _pairs(scene) -> set[tuple[str, str]]:
    return {(scene.shape, scene.color), (scene.shape, scene.position), (scene.color, scene.position)}


def test_all_scenes_and_captions_round_trip():
    scenes = shapes.all_scenes()
    assert len(scenes) == len(set(scenes)) == 3 * 6 * 9
    assert shapes.all_scenes() == scenes
    captions = [scene.caption() for scene in scenes]
    assert len(set(captions)) == len(captions)
    for scene, caption in zip(scenes, captions, strict=True):
        assert caption == caption.lower() and caption == " ".join(caption.split())
        assert shapes.parse_caption(caption) == scene
        assert shapes.parse_caption(f"  {caption.upper()}.  ") == scene
    assert Scene("circle", "red", "top left").caption() == "a red circle at the top left"
    assert Scene("circle", "red", "top").caption() == "a red circle at the top"
    assert Scene("square", "blue", "left").caption() == "a blue square on the left"
    assert Scene("triangle", "green", "center").caption() == "a green triangle in the center"


@pytest.mark.parametrize("junk", ["a blue", "", "   ", "a red hexagon at the top", "a red circle at the middle",
                                  "a red circle at the top left please", "red circle top left"])
def test_parse_caption_rejects_junk(junk):
    assert shapes.parse_caption(junk) is None


def test_caption_words_cover_every_caption():
    words = shapes.caption_words()
    assert words == sorted(set(words))
    used = {word for scene in shapes.all_scenes() for word in scene.caption().split()}
    assert set(words) == used
    assert {"a", "the", "circle", "magenta", "top", "center"} <= set(words)


def test_scene_rejects_unknown_attributes():
    with pytest.raises(ValueError):
        Scene("hexagon", "red", "top")


def test_split_keeps_every_attribute_pair_in_training():
    train, held = shapes.split_scenes(held_out=16, seed=0)
    assert len(train) == 162 - 16 and len(held) == 16
    assert not set(train) & set(held)
    assert set(train) | set(held) == set(shapes.all_scenes())
    every = set().union(*(_pairs(scene) for scene in shapes.all_scenes()))
    assert set().union(*(_pairs(scene) for scene in train)) == every
    assert shapes.split_scenes(held_out=16, seed=0) == (train, held)
    assert set(shapes.split_scenes(held_out=16, seed=1)[1]) != set(held)
    for seed in range(3):  # many held out: a choice that ignored the pairs would lose some
        big_train, big_held = shapes.split_scenes(held_out=60, seed=seed)
        assert len(big_held) == 60 and set().union(*(_pairs(scene) for scene in big_train)) == every
    with pytest.raises(ValueError):
        shapes.split_scenes(held_out=150)


def test_render_types_and_canonical_determinism():
    scene = Scene("triangle", "yellow", "bottom right")
    image = shapes.render(scene)
    assert image.dtype == np.uint8 and image.shape == (32, 32, 3)
    assert np.array_equal(image, shapes.render(scene))
    colours = {tuple(pixel) for pixel in image.reshape(-1, 3)}
    assert colours == {(0, 0, 0), shapes.COLORS["yellow"]}
    extent = 0.3 * 32
    assert 0.8 * extent**2 / 2 < (image.max(axis=2) > 0).sum() < 1.2 * extent**2 / 2  # a triangle: half its box
    square = shapes.render(Scene("square", "red", "center")).max(axis=2) > 0
    assert square.any(axis=0).sum() in (9, 10) and square.any(axis=1).sum() in (9, 10)
    assert shapes.render(scene, size=48).shape == (48, 48, 3)


def test_checker_reads_every_canonical_render():
    for size in (24, 32, 64):
        wrong = [scene for scene in shapes.all_scenes() if shapes.read_scene(shapes.render(scene, size)) != scene]
        assert not wrong, f"size {size}: {len(wrong)} of 162 misread, e.g. {wrong[:3]}"


def test_checker_reads_jittered_and_noisy_renders():
    rng = np.random.default_rng(0)
    scenes = [shapes.all_scenes()[i] for i in rng.integers(len(shapes.all_scenes()), size=1000)]
    images = np.stack([shapes.render(scene, shapes.IMAGE_SIZE, rng) for scene in scenes])
    assert images.shape == (1000, 32, 32, 3) and images.dtype == np.uint8
    jittered = sum(shapes.read_scene(image) == scene for scene, image in zip(scenes, images, strict=True))
    assert jittered >= 990, f"jittered renders read back: {jittered}/1000"
    noisy = np.clip(images + rng.normal(0, 20, images.shape), 0, 255).astype(np.uint8)
    assert not np.array_equal(noisy, images)
    read = sum(shapes.read_scene(image) == scene for scene, image in zip(scenes, noisy, strict=True))
    assert read >= 950, f"noisy renders (std 20) read back: {read}/1000"


def test_jitter_changes_pixels_but_not_the_read():
    rng = np.random.default_rng(1)
    for scene in shapes.all_scenes()[::7]:
        canonical = shapes.render(scene)
        jittered = [shapes.render(scene, rng=rng) for _ in range(4)]
        assert any(not np.array_equal(image, canonical) for image in jittered), scene
        assert all(shapes.read_scene(image) == scene for image in jittered), scene


def test_checker_edge_cases():
    assert shapes.read_scene(np.zeros((32, 32, 3), np.uint8)) is None
    specks = np.zeros((32, 32, 3), np.uint8)
    specks[3, 3] = specks[20, 9] = (255, 0, 0)
    assert shapes.read_scene(specks) is None  # no component of MIN_PIXELS
    scene = Scene("circle", "cyan", "bottom left")
    assert shapes.read_scene(shapes.render(scene) // 2) == scene  # dim: 127 is still above the threshold
    image = shapes.render(scene)
    image[2:5, 26:30] = shapes.COLORS["red"]  # a smaller second blob at the top right
    assert shapes.read_scene(image) == scene
    with pytest.raises(ValueError):
        shapes.read_scene(np.zeros((32, 32), np.uint8))


def test_attribute_matches():
    expected = Scene("square", "green", "top")
    assert shapes.attribute_matches(expected, None) == {"shape": False, "color": False, "position": False}
    assert shapes.attribute_matches(expected, expected) == {"shape": True, "color": True, "position": True}
    got = Scene("circle", "green", "left")
    assert shapes.attribute_matches(expected, got) == {"shape": False, "color": True, "position": False}


def test_image_grid_size():
    images = [shapes.render(scene) for scene in shapes.all_scenes()[:10]]
    grid = shapes.image_grid(images, columns=4, scale=3)
    assert grid.size == (4 * (96 + 2) + 2, 3 * (96 + 2) + 2)
    labelled = shapes.image_grid(images, labels=[s.caption() for s in shapes.all_scenes()[:10]], columns=4)
    assert labelled.size[0] == grid.size[0] and labelled.size[1] > grid.size[1]
    assert shapes.image_grid(images[:2], columns=8, scale=1).size == (2 * (32 + 2) + 2, 32 + 4)
    tile = np.asarray(grid)[2:98, 2:98]
    assert np.array_equal(tile[::3, ::3], images[0])
