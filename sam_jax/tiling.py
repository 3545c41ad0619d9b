"""Tiled inference on images larger than the model input, as micro_sam does it.

The image is cut into a grid of inner tiles of `tile_shape` (h, w) pixels (the last row and column
clipped to the image); each tile is widened by `halo` (h, w) pixels on every side, clipped to the
image: the tile-with-halo ("outer" box) is what the encoder sees, resized by the usual
longest-side transform. Boxes here are XYXY with exclusive max (as crop boxes), in pixels of the
full image; mask boxes (`boxes` of AMG data) are XYXY with inclusive max (`amg.masks`).

- `check_tiling`: the one validation of (tile_shape, halo) (`ConfigError`, a `UsageError` and a
  `ValueError`, one line).
- `TileGrid`: inner and outer boxes of every tile, row-major.
- `TiledEmbeddings`: the per-tile embeddings (`functional.encode_image_tiled` computes them one
  tile at a time through the jitted encoder: every tile is one (1, S, S, 3) input).
- Prompts (`choose_tiles`, `predict_in_tiles`): a prompt is decoded in the one tile-with-halo that
  holds it with the most margin, and its masks are pasted back in full-image coordinates.
- Automatic masks per tile, merged across seams: `sam_jax.amg.tiles`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from sam_jax.errors import ConfigError

# ----------------------------------------------------------------------------- settings


def _pair(name: str, value: Any) -> tuple[int, int]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise ConfigError(f"{name} must be two integers (h, w), got {value!r}")
    out = []
    for v in value:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise ConfigError(f"{name} must be two integers (h, w), got {value!r}")
        out.append(int(v))
    if min(out) < 1:
        raise ConfigError(f"{name} must be positive, got {tuple(out)}")
    return out[0], out[1]


def check_tiling(tile_shape, halo) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """(tile_shape, halo) as pairs of ints, or None when both are None (no tiling).

    Both are (h, w) pixel counts of the original image: tile_shape >= 1, halo >= 1 and
    tile_shape > 2 * halo on each axis. Raises `ConfigError` (one line) otherwise."""
    if tile_shape is None and halo is None:
        return None
    if tile_shape is None or halo is None:
        raise ConfigError("tile_shape and halo go together: give both (h, w) or neither")
    tile, hal = _pair("tile_shape", tile_shape), _pair("halo", halo)
    if tile[0] <= 2 * hal[0] or tile[1] <= 2 * hal[1]:
        raise ConfigError(f"tile_shape {tile} must be larger than 2 * halo {hal} on both axes")
    return tile, hal


# ----------------------------------------------------------------------------- grid


@dataclasses.dataclass(frozen=True)
class TileGrid:
    """The tiles of an (H, W) image: inner (T, 4) and outer (T, 4) int64 XYXY boxes (exclusive
    max), row-major over `shape` (rows, cols) tiles. Build with `TileGrid.build`."""

    image_shape: tuple[int, int]
    tile_shape: tuple[int, int]
    halo: tuple[int, int]
    shape: tuple[int, int]
    inner: np.ndarray
    outer: np.ndarray

    @classmethod
    def build(cls, image_shape, tile_shape, halo) -> TileGrid:
        """Grid of an (H, W) image; tile_shape and halo as `check_tiling` returns them."""
        h, w = int(image_shape[0]), int(image_shape[1])
        (th, tw), (hh, hw) = tile_shape, halo
        ys, xs = range(0, h, th), range(0, w, tw)
        inner = np.array(
            [[x, y, min(x + tw, w), min(y + th, h)] for y in ys for x in xs], np.int64
        ).reshape(-1, 4)
        pad = np.array([-hw, -hh, hw, hh], np.int64)
        outer = np.clip(inner + pad, 0, np.array([w, h, w, h], np.int64))
        return cls((h, w), (th, tw), (hh, hw), (len(ys), len(xs)), inner, outer)

    @property
    def num_tiles(self) -> int:
        return len(self.inner)

    def crop(self, image: np.ndarray, t: int) -> np.ndarray:
        """The tile-with-halo t of an (H, W, ...) array (a view)."""
        x0, y0, x1, y1 = self.outer[t]
        return image[y0:y1, x0:x1]

    def outer_shape(self, t: int) -> tuple[int, int]:
        x0, y0, x1, y1 = self.outer[t]
        return int(y1 - y0), int(x1 - x0)

    def neighbour_pairs(self) -> list[tuple[int, int, np.ndarray]]:
        """(t, u, window) for t < u whose outer boxes overlap; window = their intersection."""
        out = []
        for t in range(self.num_tiles):
            for u in range(t + 1, self.num_tiles):
                win = intersect(self.outer[t], self.outer[u])
                if win is not None:
                    out.append((t, u, win))
        return out


def intersect(a, b) -> np.ndarray | None:
    """Intersection of two exclusive-max XYXY boxes, or None when empty."""
    box = np.concatenate([np.maximum(a[:2], b[:2]), np.minimum(a[2:], b[2:])])
    return box if box[2] > box[0] and box[3] > box[1] else None


@dataclasses.dataclass
class TiledEmbeddings:
    """Embeddings of one image, per tile: features[t] (1, g, g, D) of the tile-with-halo
    grid.outer[t]; input_sizes[t] its (h, w) after the longest-side resize."""

    grid: TileGrid
    features: list
    input_sizes: list[tuple[int, int]]


# ----------------------------------------------------------------------------- prompts


def prompt_extents(point_coords=None, boxes=None) -> np.ndarray:
    """(P, 4) float64 XYXY extent of each prompt: the bounding box of its points (P, N, 2) (all of
    them, background ones included) and of its box (P, 4)."""
    parts = []
    if point_coords is not None:
        pts = np.asarray(point_coords, np.float64)
        parts.append(np.concatenate([pts.min(axis=1), pts.max(axis=1)], axis=-1))
    if boxes is not None:
        parts.append(np.asarray(boxes, np.float64).reshape(-1, 4))
    if not parts:
        raise ValueError("tiled prediction needs a point or a box to choose a tile")
    ext = parts[0]
    for p in parts[1:]:
        ext = np.concatenate(
            [np.minimum(ext[:, :2], p[:, :2]), np.maximum(ext[:, 2:], p[:, 2:])], 1
        )
    return ext


def tile_margins(grid: TileGrid, extents: np.ndarray) -> np.ndarray:
    """(P, T) signed margin of each prompt extent (P, 4) inside each tile-with-halo: the smallest
    distance from the extent to a side of the outer box that is not an image edge (image edges
    bound the untiled image too, so they do not count; +inf when every side is an image edge).
    Negative when the extent crosses such a side."""
    h, w = grid.image_shape
    o = grid.outer.astype(np.float64)[None]  # (1, T, 4)
    e = extents[:, None]  # (P, 1, 4)
    sides = np.stack(
        [
            e[..., 0] - o[..., 0],
            e[..., 1] - o[..., 1],
            o[..., 2] - e[..., 2],
            o[..., 3] - e[..., 3],
        ],
        -1,
    )
    image_edge = np.stack([o[..., 0] == 0, o[..., 1] == 0, o[..., 2] == w, o[..., 3] == h], -1)
    return np.where(image_edge, np.inf, sides).min(axis=-1)


def choose_tiles(grid: TileGrid, point_coords=None, boxes=None) -> np.ndarray:
    """(P,) int64 tile of each prompt (points (P, N, 2) and/or boxes (P, 4), image pixels).

    The tile-with-halo that holds the prompt's extent with the largest margin (`tile_margins`);
    when no tile holds it, the one whose outer box overlaps the extent most (then the largest
    margin). Ties go to the first tile in row-major order."""
    ext = prompt_extents(point_coords, boxes)
    margins = tile_margins(grid, ext)
    o, e = grid.outer.astype(np.float64)[None], ext[:, None]
    # Overlap of the extent (as a pixel range, so that a point counts) with each outer box.
    spans = [
        np.minimum(e[..., i + 2], o[..., i + 2]) - np.maximum(e[..., i], o[..., i]) for i in (0, 1)
    ]
    overlap = np.maximum(spans[0] + 1, 0) * np.maximum(spans[1] + 1, 0)
    out = np.empty(len(ext), np.int64)
    for p in range(len(ext)):
        if np.any(margins[p] >= 0):
            out[p] = np.argmax(margins[p])  # argmax: the first of equal margins
        else:
            cand = np.flatnonzero(overlap[p] == overlap[p].max())
            out[p] = cand[np.argmax(margins[p][cand])]
    return out


def paste(masks: np.ndarray, grid: TileGrid, t: int, fill) -> np.ndarray:
    """Tile-frame masks (..., h, w) of tile-with-halo t -> (..., H, W), `fill` outside it."""
    h, w = grid.image_shape
    out = np.full((*masks.shape[:-2], h, w), fill, masks.dtype)
    x0, y0, x1, y1 = grid.outer[t]
    out[..., y0:y1, x0:x1] = masks
    return out


def predict_in_tiles(
    grid: TileGrid, tile_ids: np.ndarray, predict_tile: Callable, fill
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decodes P prompts grouped by tile and pastes their masks into the full image.

    predict_tile(t, rows, offset) -> (masks (p, C, h, w), iou (p, C), low_res (p, C, m, m)) for the
    prompts `rows` (p,) of tile t, whose coordinates are to be shifted by -offset (x0, y0). Returns
    masks (P, C, H, W) (`fill` outside each prompt's tile), iou (P, C) and low_res (P, C, m, m),
    the latter in the frame of each prompt's tile."""
    masks = iou = low_res = None
    h, w = grid.image_shape
    for t in np.unique(tile_ids):
        rows = np.flatnonzero(tile_ids == t)
        x0, y0, x1, y1 = grid.outer[t]
        m, s, lr = predict_tile(int(t), rows, np.array([x0, y0], np.float64))
        if masks is None:
            p = len(tile_ids)
            masks = np.full((p, m.shape[1], h, w), fill, m.dtype)
            iou = np.zeros((p, *s.shape[1:]), s.dtype)
            low_res = np.zeros((p, *lr.shape[1:]), lr.dtype)
        masks[rows, :, y0:y1, x0:x1] = m
        iou[rows], low_res[rows] = s, lr
    return masks, iou, low_res
