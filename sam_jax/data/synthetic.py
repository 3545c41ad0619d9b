"""A built-in, deterministic dataset of images with instance masks (numpy + pillow only).

Each image is a textured background (gradient, low-frequency noise, faint stripes, muted colours)
with a handful of vivid objects: ellipses, rotated rectangles, polygons and rings, filled with a
solid colour, stripes, noise, a gradient or a checkerboard. Objects are painted in order, so later
ones occlude earlier ones and every mask is the visible part of its object. Some objects carry a
smaller part of a distinct colour inside them; the whole and the part are both masks, so a point on
the part is ambiguous (as in SA-1B). Every image is a pure function of (seed, split, index); the
splits "train", "val" and "test" draw from disjoint random streams.
"""

from __future__ import annotations

import colorsys
import dataclasses

import numpy as np
from PIL import Image, ImageDraw

SPLITS = ("train", "val", "test")
_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
SHAPES = ("ellipse", "rectangle", "polygon", "ring")
TEXTURES = ("solid", "stripes", "noise", "gradient", "checker")
# Colour names of the hue wheel, each covering a sixth of it centred on its hue (red at 0): an
# object is named "<colour> <shape>" (e.g. "red ring"), what the text-prompt demo learns.
COLOR_NAMES = ("red", "yellow", "green", "cyan", "blue", "magenta")


def color_name(hue: float) -> str:
    """The name of a hue in [0, 1) (COLOR_NAMES, nearest)."""
    return COLOR_NAMES[int(np.floor((hue % 1.0) * len(COLOR_NAMES) + 0.5)) % len(COLOR_NAMES)]


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Synthetic dataset parameters.

    image_size: (H, W) or an int for square images. Object areas are drawn in
    [min_area, max_area] (fractions of the image); visible masks under `min_visible` of the image
    are dropped. part_prob: chance that an object (of area >= 0.1) gets an inner part.
    texture_strength scales the contrast inside textured objects (stripes, noise, gradient,
    checker; 1 = full, 0 = flat colours): lower values give an easier dataset, same layouts.
    """

    image_size: int | tuple[int, int] = 128
    num_train: int = 2000
    num_val: int = 64
    num_test: int = 64
    min_objects: int = 2
    max_objects: int = 5
    min_area: float = 0.05
    max_area: float = 0.4
    part_prob: float = 0.4
    min_visible: float = 0.01
    texture_strength: float = 1.0
    seed: int = 0

    def __post_init__(self):
        h, w = self.hw
        if h < 8 or w < 8:
            raise ValueError(f"synthetic image_size must be at least 8x8, got {(h, w)}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError("synthetic needs 1 <= min_objects <= max_objects")
        if not 0 < self.min_area <= self.max_area < 1:
            raise ValueError("synthetic needs 0 < min_area <= max_area < 1")
        if not 0 <= self.part_prob <= 1:
            raise ValueError(f"synthetic part_prob must be in [0, 1], got {self.part_prob}")
        if not 0 <= self.texture_strength <= 1:
            raise ValueError(
                f"synthetic texture_strength must be in [0, 1], got {self.texture_strength}"
            )
        if min(self.num_train, self.num_val, self.num_test) < 0:
            raise ValueError("synthetic split sizes must be >= 0")

    @property
    def hw(self) -> tuple[int, int]:
        s = self.image_size
        return (int(s), int(s)) if np.isscalar(s) else (int(s[0]), int(s[1]))

    def num_images(self, split: str) -> int:
        _check_split(split)
        return {"train": self.num_train, "val": self.num_val, "test": self.num_test}[split]


def _check_split(split: str) -> None:
    if split not in _SPLIT_IDS:
        raise ValueError(f"synthetic split must be one of {SPLITS}, got {split!r}")


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32) * 255.0


def _polygon_mask(points: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Rasterises an (n, 2) array of (x, y) vertices into a bool (H, W) mask."""
    canvas = Image.new("L", (hw[1], hw[0]), 0)
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in points.tolist()], fill=1)
    return np.asarray(canvas, dtype=bool)


def _ellipse_points(cx, cy, a, b, theta, n=48) -> np.ndarray:
    t = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    x, y = a * np.cos(t), b * np.sin(t)
    c, s = np.cos(theta), np.sin(theta)
    return np.stack([cx + c * x - s * y, cy + s * x + c * y], -1)


def _shape_mask(rng: np.random.Generator, kind: str, cx, cy, area: float, hw) -> np.ndarray:
    """A bool (H, W) mask of a `kind` shape of about `area` pixels centred at (cx, cy)."""
    theta = rng.uniform(0, np.pi)
    aspect = np.exp(rng.uniform(np.log(0.5), np.log(2.0)))
    if kind == "rectangle":
        h = np.sqrt(area / aspect)
        w = aspect * h
        corners = np.array([[-w, -h], [w, -h], [w, h], [-w, h]]) / 2
        c, s = np.cos(theta), np.sin(theta)
        pts = corners @ np.array([[c, s], [-s, c]]) + [cx, cy]
        return _polygon_mask(pts, hw)
    if kind == "polygon":
        n = int(rng.integers(5, 10))
        angles = np.sort(rng.uniform(0, 2 * np.pi, n))
        radii = rng.uniform(0.6, 1.0, n)
        r = np.sqrt(area / (0.5 * n * np.sin(2 * np.pi / n) * np.mean(radii) ** 2))
        pts = np.stack([cx + r * radii * np.cos(angles), cy + r * radii * np.sin(angles)], -1)
        return _polygon_mask(pts, hw)
    if kind == "ring":
        inner = rng.uniform(0.4, 0.65)
        b = np.sqrt(area / (np.pi * aspect * (1 - inner**2)))
        outer = _polygon_mask(_ellipse_points(cx, cy, aspect * b, b, theta), hw)
        hole = _polygon_mask(_ellipse_points(cx, cy, inner * aspect * b, inner * b, theta), hw)
        return outer & ~hole
    b = np.sqrt(area / (np.pi * aspect))  # ellipse
    return _polygon_mask(_ellipse_points(cx, cy, aspect * b, b, theta), hw)


def _texture(
    rng: np.random.Generator, color: np.ndarray, hw, yy, xx, strength: float = 1.0
) -> np.ndarray:
    """A float32 (H, W, 3) fill of a random texture kind around `color` (contrast x strength)."""
    kind = TEXTURES[int(rng.integers(len(TEXTURES)))]
    base = np.broadcast_to(color, (*hw, 3)).astype(np.float32)
    if kind == "solid":
        return base
    if kind == "noise":
        return base + strength * rng.normal(0.0, 18.0, (*hw, 1)).astype(np.float32)
    angle = rng.uniform(0, np.pi)
    u = np.cos(angle) * xx + np.sin(angle) * yy
    if kind == "stripes":
        period = rng.uniform(4.0, 12.0)
        on = (np.floor(u / (period / 2)) % 2)[..., None].astype(np.float32)
        return base * (1.0 - 0.45 * strength * on)
    if kind == "gradient":
        t = ((u - u.min()) / max(np.ptp(u), 1e-6))[..., None].astype(np.float32)
        return base * (1.0 - 0.5 * strength * t)
    cell = rng.uniform(4.0, 10.0)  # checker
    on = ((np.floor(xx / cell) + np.floor(yy / cell)) % 2)[..., None].astype(np.float32)
    return base * (1.0 - 0.4 * strength * on)


def _background(rng: np.random.Generator, hw, yy, xx) -> np.ndarray:
    """A float32 (H, W, 3) muted, textured background."""
    h, w = hw
    img = np.broadcast_to(
        _hsv(rng.uniform(), rng.uniform(0.05, 0.3), rng.uniform(0.3, 0.7)), (h, w, 3)
    ).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    u = (np.cos(angle) * xx + np.sin(angle) * yy) / max(h, w)
    img = img + (rng.uniform(-40, 40, 3) * u[..., None]).astype(np.float32)
    grid = rng.normal(0.0, 12.0, (int(rng.integers(3, 8)), int(rng.integers(3, 8)), 3))
    low = np.stack(
        [
            np.asarray(
                Image.fromarray(grid[..., c].astype(np.float32), "F").resize((w, h), Image.BILINEAR)
            )
            for c in range(3)
        ],
        -1,
    )
    img = img + low
    if rng.uniform() < 0.5:
        period = rng.uniform(6.0, 20.0)
        img = img + (6.0 * np.sin(2 * np.pi * (xx * np.cos(angle) - yy * np.sin(angle)) / period))[
            ..., None
        ].astype(np.float32)
    return np.ascontiguousarray(img + rng.normal(0.0, 3.0, (h, w, 1)).astype(np.float32))


def synthetic_example(
    index: int, split: str = "train", config: SyntheticConfig | None = None
) -> dict:
    """Generates image `index` of `split`.

    Returns {"image": uint8 (H, W, 3), "masks": bool (M, H, W) visible instance masks, M >= 1,
    "parents": int32 (M,) index of the mask this one is a part of (-1 for none),
    "names": list of M str, each mask's colour and shape ("red ring", `color_name`),
    "image_id": str}. Part masks lie inside their parent mask; other masks do not overlap.
    """
    config = config or SyntheticConfig()
    _check_split(split)
    if index < 0:
        raise ValueError(f"synthetic index must be >= 0, got {index}")
    rng = np.random.default_rng([config.seed, _SPLIT_IDS[split], int(index)])
    hw = config.hw
    h, w = hw
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    while True:  # redraw (deterministically) in the rare case no mask is visible enough
        image, masks, parents, names = _draw(rng, config, hw, yy, xx)
        if masks:
            break
    return {
        "image": image,
        "masks": np.stack(masks),
        "parents": np.asarray(parents, dtype=np.int32),
        "names": names,
        "image_id": f"synthetic-{config.seed}-{split}-{int(index)}",
    }


def _draw(rng, config: SyntheticConfig, hw, yy, xx):
    h, w = hw
    image = _background(rng, hw, yy, xx)
    objects = []  # (whole shape, part shape or None, whole's name, part's name or None)
    for _ in range(int(rng.integers(config.min_objects, config.max_objects + 1))):
        area_frac = np.exp(rng.uniform(np.log(config.min_area), np.log(config.max_area)))
        kind = SHAPES[int(rng.integers(len(SHAPES)))]
        cx, cy = rng.uniform(0.15, 0.85) * w, rng.uniform(0.15, 0.85) * h
        whole = _shape_mask(rng, kind, cx, cy, area_frac * h * w, hw)
        hue = rng.uniform()
        color = _hsv(hue, rng.uniform(0.6, 1.0), rng.uniform(0.65, 1.0))
        image[whole] = _texture(rng, color, hw, yy, xx, config.texture_strength)[whole]
        part = part_name = None
        if area_frac >= 0.1 and rng.uniform() < config.part_prob and whole.any():
            ys, xs = np.nonzero(whole)
            j = int(rng.integers(len(ys)))  # centre the part on a random pixel of the whole
            part_kind = SHAPES[int(rng.integers(3))]  # no rings for parts
            part_area = rng.uniform(0.15, 0.35) * whole.sum()
            part = _shape_mask(rng, part_kind, xs[j], ys[j], part_area, hw) & whole
            part_hue = hue + rng.uniform(0.3, 0.7)
            pcolor = _hsv(part_hue, rng.uniform(0.6, 1.0), rng.uniform(0.65, 1.0))
            image[part] = _texture(rng, pcolor, hw, yy, xx, config.texture_strength)[part]
            part_name = f"{color_name(part_hue)} {part_kind}"
        objects.append((whole, part, f"{color_name(hue)} {kind}", part_name))
    masks, parents, names = [], [], []
    covered = np.zeros(hw, dtype=bool)  # union of the objects painted later
    min_pixels = max(4, int(config.min_visible * h * w))
    for whole, part, whole_name, part_name in reversed(objects):
        vis_whole = whole & ~covered
        whole_idx = -1
        if vis_whole.sum() >= min_pixels:
            masks.append(vis_whole)
            parents.append(-1)
            names.append(whole_name)
            whole_idx = len(masks) - 1
        if part is not None:
            vis_part = part & ~covered
            if vis_part.sum() >= min_pixels:
                masks.append(vis_part)
                parents.append(whole_idx)
                names.append(part_name)
        covered |= whole
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    # masks were collected top-down; return them in painting order (parts after their whole)
    order = _painting_order(parents)
    remap = {old: new for new, old in enumerate(order)}
    masks = [masks[i] for i in order]
    names = [names[i] for i in order]
    parents = [remap[parents[i]] if parents[i] >= 0 else -1 for i in order]
    return image, masks, parents, names


def _painting_order(parents: list[int]) -> list[int]:
    """Order that reverses the top-down object order but keeps each whole before its part."""
    groups, i = [], 0
    while i < len(parents):
        if i + 1 < len(parents) and parents[i + 1] == i:
            groups.append([i, i + 1])
            i += 2
        else:
            groups.append([i])
            i += 1
    return [j for g in reversed(groups) for j in g]


class SyntheticDataset:
    """The finite synthetic split: len() images, dataset[i] -> synthetic_example(i, split)."""

    def __init__(self, split: str = "train", config: SyntheticConfig | None = None):
        _check_split(split)
        self.split = split
        self.config = config or SyntheticConfig()

    def __len__(self) -> int:
        return self.config.num_images(self.split)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"synthetic {self.split} index {index} out of range [0, {len(self)})")
        return synthetic_example(index, self.split, self.config)
