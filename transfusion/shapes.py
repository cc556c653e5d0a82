"""The procedural "shapes world": captions, images and a pixel checker for a small Transfusion text+image model.

A scene is one filled shape (circle, square or upright triangle) in one of six saturated colours, centred in one
cell of a 3x3 grid on a black background. Captions follow one fixed grammar ("a red circle at the top left",
"a blue square on the left", "a green triangle in the center"), so `parse_caption` inverts them exactly.

`split_scenes` holds out whole attribute combinations while keeping every pair of attribute values in training,
so held-out scenes test compositional generalisation. `read_scene` is the deterministic checker that scores
generated images: it thresholds the image, keeps the largest 4-connected component (holes filled), and reads the
colour from the component's chromaticity, the position from its centroid's cell and the shape from the canonical
template (same area, same centroid) that overlaps it best, or "triangle" when the component's rows are clearly
skewed towards the bottom (blur rounds a triangle's corners until the circle template can fit better).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Callable

    from PIL import Image

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
}
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right",
)
IMAGE_SIZE = 32

EXTENT = 0.3  # a shape's canonical width and height, as a fraction of the image size
CENTER_JITTER = 0.05  # with an rng: the centre moves up to this fraction of the size (1.6 px at 32) on each axis
EXTENT_JITTER = 0.1  # with an rng: the extent is scaled by a factor in [1 - this, 1 + this]
MASK_THRESHOLD = 100  # read_scene: a pixel belongs to a shape when its brightest channel exceeds this
MIN_PIXELS = 0.005  # read_scene: the largest component must cover this fraction of the image (5 px at 32)
TRIANGLE_SKEW = -0.2  # read_scene: rows' skewness below this means a triangle (upright: about -0.57; others: 0)

_PREPOSITIONS = {"center": "in", "left": "on", "right": "on"}  # every other position takes "at"


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    position: str

    def __post_init__(self) -> None:
        if self.shape not in SHAPES or self.color not in COLORS or self.position not in POSITIONS:
            raise ValueError(f"unknown scene attribute in {self!r}")

    def caption(self) -> str:
        """E.g. "a red circle at the top left", "a red circle on the left", "a red circle in the center"."""
        return f"a {self.color} {self.shape} {_PREPOSITIONS.get(self.position, 'at')} the {self.position}"


def all_scenes() -> list[Scene]:
    """Every scene (3 shapes x 6 colours x 9 positions = 162), shape-major, in the constants' order."""
    return [Scene(s, c, p) for s, c, p in itertools.product(SHAPES, COLORS, POSITIONS)]


@cache
def _scenes_by_caption() -> dict[str, Scene]:
    return {scene.caption(): scene for scene in all_scenes()}


def parse_caption(text: str) -> Scene | None:
    """The scene a caption describes (case, surrounding space, repeated spaces and a final "." tolerated), else None."""
    return _scenes_by_caption().get(" ".join(text.lower().strip().rstrip(".").split()))


def caption_words() -> list[str]:
    """Every word any caption uses, sorted and unique: the text model's word vocabulary."""
    return sorted({word for caption in _scenes_by_caption() for word in caption.split()})


def _pairs(scene: Scene) -> tuple[tuple[str, str, str], ...]:
    return (("sc", scene.shape, scene.color), ("sp", scene.shape, scene.position), ("cp", scene.color, scene.position))


def split_scenes(held_out: int = 16, seed: int = 0) -> tuple[list[Scene], list[Scene]]:
    """(train, held-out), both in `all_scenes` order: `held_out` scenes chosen by `seed` such that every pair of
    attribute values (shape-colour, shape-position, colour-position) still occurs in at least one training scene."""
    scenes = all_scenes()
    counts: dict[tuple[str, str, str], int] = {}
    for scene in scenes:
        for pair in _pairs(scene):
            counts[pair] = counts.get(pair, 0) + 1
    chosen: set[Scene] = set()
    for index in np.random.default_rng(seed).permutation(len(scenes)):
        if len(chosen) == held_out:
            break
        scene = scenes[index]
        if all(counts[pair] > 1 for pair in _pairs(scene)):
            chosen.add(scene)
            for pair in _pairs(scene):
                counts[pair] -= 1
    if len(chosen) < held_out:
        raise ValueError(f"cannot hold out {held_out} scenes and keep every attribute pair in training")
    return [s for s in scenes if s not in chosen], [s for s in scenes if s in chosen]


def _cell_center(position: str, size: int) -> tuple[float, float]:
    row, col = divmod(POSITIONS.index(position), 3)
    return (col + 0.5) * size / 3, (row + 0.5) * size / 3


def _shape_mask(shape: str, cx: float, cy: float, extent: float, size: int) -> np.ndarray:
    """Pixels (by their centres) inside a shape of width and height `extent` whose bounding box is centred at
    (cx, cy); the triangle is upright and isosceles, its apex at the top and its base as wide as it is tall."""
    y, x = np.mgrid[0:size, 0:size] + 0.5
    half = extent / 2
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= half**2
    if shape == "square":
        return (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
    if shape == "triangle":
        top = cy - half
        return (y >= top) & (y <= cy + half) & (np.abs(x - cx) <= (y - top) / 2)
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, size: int = IMAGE_SIZE, rng: np.random.Generator | None = None) -> np.ndarray:
    """(size, size, 3) uint8: the scene's shape, filled in its colour with hard edges, centred in its cell on black.

    With `rng`, the centre moves by up to CENTER_JITTER * size on each axis and the extent is scaled by up to
    +-EXTENT_JITTER; the shape always stays whole inside the image and its centroid inside its cell."""
    cx, cy = _cell_center(scene.position, size)
    extent = EXTENT * size
    if rng is not None:
        extent *= 1 + rng.uniform(-EXTENT_JITTER, EXTENT_JITTER)
        dx, dy = rng.uniform(-CENTER_JITTER * size, CENTER_JITTER * size, size=2)
        half = extent / 2
        cx, cy = (float(np.clip(c + d, half, size - half)) for c, d in ((cx, dx), (cy, dy)))
    image = np.zeros((size, size, 3), dtype=np.uint8)
    image[_shape_mask(scene.shape, cx, cy, extent, size)] = COLORS[scene.color]
    return image


def _component_labels(mask: np.ndarray) -> np.ndarray:
    """4-connected component labels of a boolean mask (0 off the mask), by label propagation: each pixel takes the
    largest label among itself and its 4 neighbours until nothing changes."""
    height, width = mask.shape
    labels = np.where(mask, np.arange(1, height * width + 1).reshape(height, width), 0)
    while True:
        grown = labels.copy()
        for ahead, behind in ((np.s_[1:], np.s_[:-1]), (np.s_[:-1], np.s_[1:])):
            np.maximum(grown[ahead], labels[behind], out=grown[ahead])
            np.maximum(grown[:, ahead], labels[:, behind], out=grown[:, ahead])
        grown *= mask
        if np.array_equal(grown, labels):
            return labels
        labels = grown


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask, with its holes filled."""
    labels = _component_labels(mask)
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    component = labels == counts.argmax()
    ys, xs = np.nonzero(component)
    box = np.s_[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    outside = _component_labels(np.pad(~component[box], 1, constant_values=True))  # the ring joins the outside
    component[box] = (outside != outside[0, 0])[1:-1, 1:-1]
    return component


def _vertical_skewness(component: np.ndarray) -> float:
    """Skewness of the component's row coordinates: about -0.57 for an upright triangle (its mass sits low), 0 for
    shapes symmetric top to bottom."""
    rows = np.nonzero(component)[0]
    dy = rows - rows.mean()
    return float((dy**3).mean() / max((dy**2).mean(), 1e-9) ** 1.5)


def _template_iou(component: np.ndarray, shape: str) -> float:
    """Intersection over union of a component with the shape's template of the same area and the same centroid."""
    area = float(component.sum())
    ys, xs = np.nonzero(component)
    extent = {"circle": 2 * np.sqrt(area / np.pi), "square": np.sqrt(area), "triangle": np.sqrt(2 * area)}[shape]
    box_cy = ys.mean() + 0.5 - (extent / 6 if shape == "triangle" else 0)  # a triangle's centroid is extent/6 low
    template = _shape_mask(shape, xs.mean() + 0.5, box_cy, extent, component.shape[0])
    return float((template & component).sum() / (template | component).sum())


def _shape_of(component: np.ndarray) -> str:
    """The best-fitting template (ties go to the square, the only shape that can fill a small block exactly), except
    that a component whose mass clearly sits low is a triangle: blur rounds a triangle until a circle fits better."""
    if _vertical_skewness(component) < TRIANGLE_SKEW:
        return "triangle"
    return max(("square", "circle", "triangle"), key=lambda shape: _template_iou(component, shape))


def read_scene(image: np.ndarray) -> Scene | None:
    """The scene in a uint8 (H, W, 3) image (square, H >= 16), read from its largest bright component; None when
    no component covers at least MIN_PIXELS of the image."""
    size = image.shape[0]
    if image.ndim != 3 or image.shape[1] != size or image.shape[2] != 3:
        raise ValueError(f"expected a square (H, W, 3) image, got shape {image.shape}")
    mask = image.max(axis=2) > MASK_THRESHOLD
    if not mask.any():
        return None
    component = _largest_component(mask)
    if component.sum() < MIN_PIXELS * size * size:
        return None
    # Colour: the nearest palette colour to the mean colour (of the bright pixels) scaled to a brightest channel of
    # 1, so dim edges and dim generations still count.
    mean = image[component & mask].astype(np.float64).mean(axis=0)
    chroma = mean / max(mean.max(), 1e-9)
    palette = np.array(list(COLORS.values()), dtype=np.float64) / 255
    color = list(COLORS)[int(np.argmin(((palette - chroma) ** 2).sum(axis=1)))]
    ys, xs = np.nonzero(component)
    row, col = (min(int((v.mean() + 0.5) * 3 / size), 2) for v in (ys, xs))
    return Scene(_shape_of(component), color, POSITIONS[3 * row + col])


def attribute_matches(expected: Scene, got: Scene | None) -> dict[str, bool]:
    """Per attribute, whether `got` agrees with `expected` (all False when nothing was read)."""
    return {name: got is not None and getattr(got, name) == getattr(expected, name)
            for name in ("shape", "color", "position")}


def _wrap(text: str, width: float, measure: Callable[[str], float]) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and measure(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def image_grid(images: list[np.ndarray], labels: list[str] | None = None, columns: int = 8,
               scale: int = 3, gap: int = 2) -> Image.Image:
    """A PIL image tiling `images` (uint8 HxWx3, all one size) upscaled `scale` times (nearest neighbour), `columns`
    per row, with `gap` px between and around tiles; each label is drawn under its tile in PIL's default font,
    word-wrapped to the tile's width. Size: (cols * (W*scale + gap) + gap, rows * (H*scale + label + gap) + gap)."""
    from PIL import Image, ImageDraw, ImageFont

    if not images:
        raise ValueError("image_grid needs at least one image")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"{len(labels)} labels for {len(images)} images")
    height, width = images[0].shape[0] * scale, images[0].shape[1] * scale
    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    font = ImageFont.load_default()
    line_height = font.getbbox("Ag")[3] + 2
    wrapped = [_wrap(label, width, font.getlength) for label in labels] if labels is not None else None
    label_height = max(len(lines) for lines in wrapped) * line_height + 2 if wrapped else 0
    cell_w, cell_h = width + gap, height + label_height + gap
    grid = Image.new("RGB", (columns * cell_w + gap, rows * cell_h + gap), (48, 48, 48))
    draw = ImageDraw.Draw(grid)
    for i, image in enumerate(images):
        x, y = gap + (i % columns) * cell_w, gap + (i // columns) * cell_h
        tile = np.repeat(np.repeat(np.asarray(image, dtype=np.uint8), scale, axis=0), scale, axis=1)
        grid.paste(Image.fromarray(tile), (x, y))
        for j, line in enumerate(wrapped[i] if wrapped else []):
            draw.text((x, y + height + 1 + j * line_height), line, fill=(255, 255, 255), font=font)
    return grid
