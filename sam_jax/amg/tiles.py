"""Automatic masks of images larger than the model input, tile by tile (micro_sam's tiled AMG):
the generator runs on every tile-with-halo of a `sam_jax.tiling.TileGrid` and the masks that cross
tile seams are merged (the rule is in `merge_tiles`). Boxes are XYXY with inclusive max, as in
`sam_jax.amg.masks`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from sam_jax.amg import masks as au
from sam_jax.tiling import TileGrid, intersect

SEAM_IOU_THRESH = 0.5  # masks of neighbouring tiles are one object above this IoU in their overlap
AMG_KEYS = ("masks", "boxes", "iou_preds", "stability_score", "points", "crop_boxes")


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
            i for i, bx in enumerate(a["boxes"]) if intersect(bx + [0, 0, 1, 1], win) is not None
        ]
        in_b = [
            j for j, bx in enumerate(b["boxes"]) if intersect(bx + [0, 0, 1, 1], win) is not None
        ]
        area_a = {i: int(_window_crop(a["crops"][i], a["boxes"][i], win).sum()) for i in in_a}
        area_b = {j: int(_window_crop(b["crops"][j], b["boxes"][j], win).sum()) for j in in_b}
        for i in in_a:
            for j in in_b:
                if not area_a[i] or not area_b[j]:
                    continue
                common = intersect(a["boxes"][i] + [0, 0, 1, 1], b["boxes"][j] + [0, 0, 1, 1])
                common = None if common is None else intersect(common, win)
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
