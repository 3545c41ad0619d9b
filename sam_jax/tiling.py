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
- AMG (`generate_tiled`): a per-tile mask source (the generator's `_generate_masks`, or any
  function of the tile's pixels) runs on every tile-with-halo; `merge_tiles` maps the masks to the
  image and merges objects across seams (rule in its docstring).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from sam_jax.errors import ConfigError

SEAM_IOU_THRESH = 0.5  # masks of neighbouring tiles are one object above this IoU in their overlap
AMG_KEYS = ("masks", "boxes", "iou_preds", "stability_score", "points", "crop_boxes")


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
                win = _intersect(self.outer[t], self.outer[u])
                if win is not None:
                    out.append((t, u, win))
        return out


def _intersect(a, b) -> np.ndarray | None:
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


# ----------------------------------------------------------------------------- AMG


def generate_tiled(
    image: np.ndarray,
    source: Callable[[np.ndarray], dict[str, np.ndarray]],
    grid: TileGrid,
    nms_thresh: float,
    iou_thresh: float = SEAM_IOU_THRESH,
) -> dict[str, np.ndarray]:
    """Runs a per-tile mask source on every tile-with-halo of `image` and merges the results.

    source(tile_image) -> AMG data in the tile frame, as `SamAutomaticMaskGenerator.
    _generate_masks` returns it: masks (K, h, w) bool, boxes (K, 4) (recomputed here from the
    masks), iou_preds (K,), stability_score (K,), points (K, 2) xy, crop_boxes (K, 4). It only
    sees the tile's pixels. Returns the same keys in the image frame (masks (K, H, W)), see
    `merge_tiles`; with a single tile, `source(image)` itself (exactly the untiled result).
    """
    if grid.num_tiles == 1:
        return source(image)
    pieces = [_pieces(source(grid.crop(image, t)), grid, t) for t in range(grid.num_tiles)]
    return merge_tiles(grid, pieces, nms_thresh, iou_thresh)


def _pieces(data: dict[str, np.ndarray], grid: TileGrid, t: int) -> dict[str, Any]:
    """Tile-frame AMG data -> the masks of tile t that touch its inner box, cropped to their
    boxes, with boxes (inclusive), points and crop boxes in the image frame."""
    from sam_jax.amg import masks as au

    masks = np.asarray(data["masks"], bool)
    if masks.shape[1:] != grid.outer_shape(t):
        raise ValueError(f"tile {t}: masks {masks.shape[1:]} but the tile is {grid.outer_shape(t)}")
    ox, oy = grid.outer[t][:2]
    ix0, iy0, ix1, iy1 = grid.inner[t] - np.array([ox, oy, ox, oy])
    boxes = np.asarray(au.batched_mask_to_box(masks), np.int64).reshape(-1, 4)
    keep, crops = [], []
    for k, (x0, y0, x1, y1) in enumerate(boxes):
        crop = masks[k, y0 : y1 + 1, x0 : x1 + 1]
        inside = crop[max(iy0 - y0, 0) : max(iy1 - y0, 0), max(ix0 - x0, 0) : max(ix1 - x0, 0)]
        if inside.any():  # empty masks and masks only in the halo are left to the neighbours
            keep.append(k)
            crops.append(crop)
    keep = np.asarray(keep, np.int64)
    offset = np.array([ox, oy, ox, oy], np.int64)
    return {
        "crops": crops,
        "boxes": boxes[keep] + offset,
        "area": np.array([c.sum() for c in crops], np.int64),
        "iou_preds": np.asarray(data["iou_preds"])[keep],
        "stability_score": np.asarray(data["stability_score"])[keep],
        "points": np.asarray(data["points"])[keep] + offset[:2],
        "crop_boxes": np.asarray(data["crop_boxes"], np.int64).reshape(-1, 4)[keep] + offset,
    }


def _window_crop(crop: np.ndarray, box: np.ndarray, win: np.ndarray) -> np.ndarray:
    """The part of a mask crop (at inclusive box) inside an exclusive-max window."""
    x0, y0 = max(win[0] - box[0], 0), max(win[1] - box[1], 0)
    x1, y1 = min(win[2], box[2] + 1) - box[0], min(win[3], box[3] + 1) - box[1]
    return crop[y0 : max(y1, y0), x0 : max(x1, x0)]


def _seam_links(grid: TileGrid, pieces: list[dict], iou_thresh: float) -> list[tuple[int, int]]:
    """Pairs of global piece indices, from neighbouring tiles, whose masks have IoU > iou_thresh
    within the overlap window of the two tiles-with-halo."""
    starts = np.cumsum([0] + [len(p["crops"]) for p in pieces])
    links = []
    for t, u, win in grid.neighbour_pairs():
        a, b = pieces[t], pieces[u]
        in_a = [
            i for i, bx in enumerate(a["boxes"]) if _intersect(bx + [0, 0, 1, 1], win) is not None
        ]
        in_b = [
            j for j, bx in enumerate(b["boxes"]) if _intersect(bx + [0, 0, 1, 1], win) is not None
        ]
        area_a = {i: int(_window_crop(a["crops"][i], a["boxes"][i], win).sum()) for i in in_a}
        area_b = {j: int(_window_crop(b["crops"][j], b["boxes"][j], win).sum()) for j in in_b}
        for i in in_a:
            for j in in_b:
                if not area_a[i] or not area_b[j]:
                    continue
                common = _intersect(a["boxes"][i] + [0, 0, 1, 1], b["boxes"][j] + [0, 0, 1, 1])
                common = None if common is None else _intersect(common, win)
                if common is None:
                    continue
                ci = _window_crop(a["crops"][i], a["boxes"][i], common)
                cj = _window_crop(b["crops"][j], b["boxes"][j], common)
                inter = int(np.count_nonzero(ci & cj))
                if inter > iou_thresh * (area_a[i] + area_b[j] - inter):
                    links.append((starts[t] + i, starts[u] + j))
    return links


def _groups(n: int, links: list[tuple[int, int]]) -> list[list[int]]:
    """Connected components (sorted lists of indices) of n nodes under links (union-find)."""
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in links:
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    return list(groups.values())


def merge_tiles(
    grid: TileGrid, pieces: list[dict], nms_thresh: float, iou_thresh: float = SEAM_IOU_THRESH
) -> dict[str, np.ndarray]:
    """Merges the per-tile masks (`_pieces` of each tile) into image-frame AMG data.

    The rule:
    1. ownership: a tile keeps only masks with a pixel in its inner box; a mask lying wholly in
       its halo is left to the neighbour(s) whose inner box it lies in (which see it too);
    2. seams: a mask of tile t and a mask of a neighbouring tile u are the same object when
       their IoU within the overlap window (outer t & outer u) exceeds `iou_thresh`; objects are
       the connected components of that relation (an object over a 4-tile corner or longer than
       a tile joins all its pieces) and their mask is the union of the pieces. An object's
       predicted_iou, stability_score and point_coords are those of its largest piece, its
       crop_box the box around its pieces' crop boxes;
    3. duplicates: box NMS over the objects in image coordinates (threshold `nms_thresh`, by
       predicted_iou), as across the crops of the untiled generator.
    A perfect per-tile source (one mask per object, restricted to the tile) then yields every
    object exactly once, whole, provided its part in each overlap window is the same from both
    sides (true for convex objects; a non-convex one may connect only outside a window).
    Returns masks (K, H, W) bool, boxes (K, 4) int64 (inclusive), iou_preds, stability_score
    (K,), points (K, 2), crop_boxes (K, 4) int64, by NMS order.
    """
    from sam_jax.amg import masks as au

    h, w = grid.image_shape
    flat = {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0] if k != "crops"}
    crops = [c for p in pieces for c in p["crops"]]
    if not crops:
        empty = {k: flat[k] for k in AMG_KEYS if k != "masks"}
        return {"masks": np.zeros((0, h, w), bool), **empty}
    groups = _groups(len(crops), _seam_links(grid, pieces, iou_thresh))
    rep = np.array([g[int(np.argmax(flat["area"][g]))] for g in groups], np.int64)
    boxes = np.array(
        [np.concatenate([flat["boxes"][g, :2].min(0), flat["boxes"][g, 2:].max(0)]) for g in groups]
    ).reshape(-1, 4)
    crop_boxes = np.array(
        [
            np.concatenate([flat["crop_boxes"][g, :2].min(0), flat["crop_boxes"][g, 2:].max(0)])
            for g in groups
        ]
    ).reshape(-1, 4)
    iou_preds = flat["iou_preds"][rep]
    order = au.batched_nms(boxes, iou_preds, np.zeros(len(groups), np.int64), nms_thresh)
    masks = np.zeros((len(order), h, w), bool)
    for row, gi in enumerate(order):
        for i in groups[gi]:
            x0, y0, x1, y1 = flat["boxes"][i]
            masks[row, y0 : y1 + 1, x0 : x1 + 1] |= crops[i]
    return {
        "masks": masks,
        "boxes": boxes[order],
        "iou_preds": iou_preds[order],
        "stability_score": flat["stability_score"][rep][order],
        "points": flat["points"][rep][order],
        "crop_boxes": crop_boxes[order],
    }
