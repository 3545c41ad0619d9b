"""Helpers of the automatic mask generator, after `segment_anything.utils.amg`.

Host helpers work on numpy (grids, crop boxes, RLE, uncrop, small-region clean-up); device
helpers take jax or numpy arrays and are jit-able with fixed shapes (stability score, mask boxes,
crop-edge test, box NMS). Masks are bool (..., H, W); boxes are XYXY with inclusive max; points
are (x, y).
"""

from __future__ import annotations

import math
from itertools import product
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sam_jax.data.rle import rle_to_mask  # noqa: F401  (the official name; one RLE decoder)
from sam_jax.prompts import bucket_size, pad_rows

# ----------------------------------------------------------------------------- grids and crops


def build_point_grid(n_per_side: int) -> np.ndarray:
    """Evenly spaced grid in [0, 1]^2: float64 (n*n, 2) of (x, y), x varying fastest."""
    if n_per_side < 1:
        raise ValueError(f"a point grid needs at least 1 point per side, got {n_per_side}")
    offset = 1 / (2 * n_per_side)
    points_one_side = np.linspace(offset, 1 - offset, n_per_side)
    points_x = np.tile(points_one_side[None, :], (n_per_side, 1))
    points_y = np.tile(points_one_side[:, None], (1, n_per_side))
    return np.stack([points_x, points_y], axis=-1).reshape(-1, 2)


def build_all_layer_point_grids(
    n_per_side: int, n_layers: int, scale_per_layer: int
) -> list[np.ndarray]:
    """Point grids for crop layers 0..n_layers: layer i has int(n / scale**i) points per side."""
    return [build_point_grid(int(n_per_side / (scale_per_layer**i))) for i in range(n_layers + 1)]


def generate_crop_boxes(
    im_size: tuple[int, int], n_layers: int, overlap_ratio: float
) -> tuple[list[list[int]], list[int]]:
    """Crop boxes (XYXY ints) and their layer index: the full image, then (2**i)**2 per layer i."""
    crop_boxes, layer_idxs = [], []
    im_h, im_w = im_size
    short_side = min(im_h, im_w)
    crop_boxes.append([0, 0, im_w, im_h])
    layer_idxs.append(0)

    def crop_len(orig_len, n_crops, overlap):
        return int(math.ceil((overlap * (n_crops - 1) + orig_len) / n_crops))

    for i_layer in range(n_layers):
        n_crops_per_side = 2 ** (i_layer + 1)
        overlap = int(overlap_ratio * short_side * (2 / n_crops_per_side))
        crop_w = crop_len(im_w, n_crops_per_side, overlap)
        crop_h = crop_len(im_h, n_crops_per_side, overlap)
        crop_box_x0 = [int((crop_w - overlap) * i) for i in range(n_crops_per_side)]
        crop_box_y0 = [int((crop_h - overlap) * i) for i in range(n_crops_per_side)]
        for x0, y0 in product(crop_box_x0, crop_box_y0):
            crop_boxes.append([x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)])
            layer_idxs.append(i_layer + 1)
    return crop_boxes, layer_idxs


# ----------------------------------------------------------------------------- boxes and points


def box_xyxy_to_xywh(box_xyxy):
    """(..., 4) XYXY -> XYWH (a copy, same type and dtype)."""
    box = np.array(box_xyxy, copy=True)
    box[..., 2] = box[..., 2] - box[..., 0]
    box[..., 3] = box[..., 3] - box[..., 1]
    return box


def uncrop_boxes_xyxy(boxes, crop_box):
    """Shifts (..., 4) boxes from the crop frame to the image frame."""
    x0, y0 = crop_box[0], crop_box[1]
    return boxes + np.asarray([x0, y0, x0, y0], dtype=np.asarray(boxes).dtype)


def uncrop_points(points, crop_box):
    """Shifts (..., 2) points from the crop frame to the image frame."""
    return points + np.asarray([crop_box[0], crop_box[1]], dtype=np.asarray(points).dtype)


def uncrop_masks(masks: np.ndarray, crop_box, orig_h: int, orig_w: int) -> np.ndarray:
    """Zero-pads (..., h, w) crop masks into the (..., orig_h, orig_w) image frame."""
    x0, y0, x1, y1 = crop_box
    if x0 == 0 and y0 == 0 and x1 == orig_w and y1 == orig_h:
        return masks
    pad_x, pad_y = orig_w - (x1 - x0), orig_h - (y1 - y0)
    pads = [(0, 0)] * (masks.ndim - 2) + [(y0, pad_y - y0), (x0, pad_x - x0)]
    return np.pad(masks, pads)


def batched_mask_to_box(masks):
    """Boxes (..., 4) int32 XYXY (inclusive max) of bool masks (..., H, W); [0,0,0,0] if empty.

    numpy in, numpy out (host); jax in, jax out (jit-able)."""
    xp = np if isinstance(masks, np.ndarray) else jnp
    masks = xp.asarray(masks, bool)
    h, w = masks.shape[-2:]
    if masks.size == 0:
        return xp.zeros((*masks.shape[:-2], 4), xp.int32)
    in_height = xp.any(masks, axis=-1)  # (..., H)
    in_width = xp.any(masks, axis=-2)  # (..., W)
    ys, xs = xp.arange(h, dtype=xp.int32), xp.arange(w, dtype=xp.int32)
    bottom = xp.max(xp.where(in_height, ys, 0), axis=-1)
    top = xp.min(xp.where(in_height, ys, h), axis=-1)
    right = xp.max(xp.where(in_width, xs, 0), axis=-1)
    left = xp.min(xp.where(in_width, xs, w), axis=-1)
    empty = (right < left) | (bottom < top)
    out = xp.stack([left, top, right, bottom], axis=-1)
    return xp.where(empty[..., None], 0, out).astype(xp.int32)


def is_box_near_crop_edge(boxes, crop_box, orig_box, atol: float = 20.0):
    """(N,) bool: the crop-frame box (N, 4), uncropped, lies within atol of a crop edge that is
    not also an image edge (such masks are likely cut by the crop)."""
    crop = jnp.asarray(crop_box, jnp.float32)
    orig = jnp.asarray(orig_box, jnp.float32)
    boxes = jnp.asarray(boxes, jnp.float32) + jnp.stack([crop[0], crop[1], crop[0], crop[1]])
    near_crop = jnp.abs(boxes - crop) <= atol
    near_image = jnp.abs(boxes - orig) <= atol
    return jnp.any(near_crop & ~near_image, axis=-1)


# ----------------------------------------------------------------------------- mask scores


def calculate_stability_score(logits, mask_threshold: float, threshold_offset: float):
    """IoU of the masks thresholded at mask_threshold +- offset: float32 (...,) from (..., H, W).

    The high mask is contained in the low one, so the IoU is a ratio of pixel counts.
    """
    logits = jnp.asarray(logits)
    hi = jnp.float32(mask_threshold + threshold_offset)
    lo = jnp.float32(mask_threshold - threshold_offset)
    intersections = jnp.sum(logits > hi, axis=(-2, -1), dtype=jnp.int32)
    unions = jnp.sum(logits > lo, axis=(-2, -1), dtype=jnp.int32)
    return intersections.astype(jnp.float32) / unions.astype(jnp.float32)


# ----------------------------------------------------------------------------- NMS


def f32_greater_threshold(threshold: float) -> np.float32:
    """The float32 t' with `x > t'` == `x > threshold` (in float64) for every float32 x.

    torchvision compares float32 IoUs to a float64 threshold; this reproduces it in float32.
    """
    t32 = np.float32(threshold)
    if float(t32) > float(threshold):
        t32 = np.nextafter(t32, np.float32(-np.inf))
    return t32


def box_nms(boxes, scores, iou_threshold, valid=None, categories=None):
    """Greedy box NMS with fixed shapes, choosing as `torchvision.ops.batched_nms` does.

    Args:
      boxes: (N, 4) XYXY, compared in float32. scores: (N,). iou_threshold: a box is dropped when
        its IoU with a kept, higher-ranked box is > threshold (pass the float32 value from
        `f32_greater_threshold` to reproduce torchvision's float64 comparison exactly).
      valid: optional (N,) bool; invalid boxes are neither kept nor suppress others.
      categories: optional (N,) ints; boxes only suppress boxes of their own category.
    Returns:
      keep (N,) int32: indices of kept boxes by descending score (ties: lower index first),
        padded with -1; num_kept () int32.
    """
    boxes = jnp.asarray(boxes, jnp.float32)
    scores = jnp.asarray(scores, jnp.float32)
    n = boxes.shape[0]
    valid = jnp.ones((n,), bool) if valid is None else jnp.asarray(valid, bool)
    order = jnp.argsort(jnp.where(valid, -scores, jnp.inf), stable=True)
    b, v = boxes[order], valid[order]
    cats = None if categories is None else jnp.asarray(categories)[order]
    areas = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    thr = jnp.asarray(iou_threshold, jnp.float32)
    ranks = jnp.arange(n)

    def body(i, suppressed):
        xx1 = jnp.maximum(b[i, 0], b[:, 0])
        yy1 = jnp.maximum(b[i, 1], b[:, 1])
        xx2 = jnp.minimum(b[i, 2], b[:, 2])
        yy2 = jnp.minimum(b[i, 3], b[:, 3])
        inter = jnp.maximum(0.0, xx2 - xx1) * jnp.maximum(0.0, yy2 - yy1)
        ovr = inter / (areas[i] + areas - inter)
        hit = (ovr > thr) & (ranks > i)
        if cats is not None:
            hit = hit & (cats == cats[i])
        return jnp.where(suppressed[i], suppressed, suppressed | hit)

    # Invalid boxes sort last, so the loop only visits the valid ones.
    suppressed = jax.lax.fori_loop(0, jnp.sum(v), body, ~v)
    kept = ~suppressed
    num_kept = jnp.sum(kept, dtype=jnp.int32)
    slot = jnp.where(kept, jnp.cumsum(kept) - 1, n)
    keep = jnp.full((n,), -1, jnp.int32).at[slot].set(order.astype(jnp.int32), mode="drop")
    return keep, num_kept


_box_nms_jit = jax.jit(box_nms)


def batched_nms(boxes, scores, idxs, iou_threshold: float) -> np.ndarray:
    """Host counterpart of `torchvision.ops.batched_nms` on numpy inputs: int64 kept indices by
    descending score. Pads to a power of two so that few shapes get compiled (padded boxes are
    flagged invalid)."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    n = boxes.shape[0]
    if n == 0:
        return np.zeros((0,), np.int64)
    size = bucket_size(n)
    keep, num = _box_nms_jit(
        pad_rows(boxes, size),
        pad_rows(np.asarray(scores, np.float32), size),
        f32_greater_threshold(iou_threshold),
        np.arange(size) < n,
        pad_rows(np.asarray(idxs).astype(np.int32), size),
    )
    return np.asarray(keep)[: int(num)].astype(np.int64)


# ----------------------------------------------------------------------------- RLE


def mask_to_rle(masks) -> list[dict[str, Any]]:
    """Uncompressed RLEs of bool masks (B, H, W): column-major runs, starting with a zero run."""
    masks = np.asarray(masks, bool)
    b, h, w = masks.shape
    flat = masks.transpose(0, 2, 1).reshape(b, h * w)
    out = []
    for i in range(b):
        f = flat[i]
        change = np.flatnonzero(f[1:] != f[:-1]) + 1
        counts = np.diff(np.concatenate([[0], change, [h * w]])).tolist()
        if f[0]:
            counts = [0] + counts
        out.append({"size": [h, w], "counts": counts})
    return out


# rle_to_mask (decoding, compressed or uncompressed) is imported from sam_jax.data.rle.


def area_from_rle(rle: dict[str, Any]) -> int:
    return int(sum(rle["counts"][1::2]))


def coco_encode_rle(uncompressed_rle: dict[str, Any]) -> dict[str, Any]:
    """Compressed COCO RLE (JSON-serialisable, counts as str) via pycocotools."""
    from pycocotools import mask as mask_utils

    h, w = uncompressed_rle["size"]
    rle = mask_utils.frPyObjects(uncompressed_rle, h, w)
    rle["counts"] = rle["counts"].decode("utf-8")
    return rle


# ----------------------------------------------------------------------------- clean-up


def _label_components(binary: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """8-connected components: (n_labels incl. background 0, labels (H, W), sizes (n_labels,))."""
    try:
        import cv2
    except ImportError:  # scipy.ndimage labels in the same raster order
        from scipy import ndimage

        regions, n = ndimage.label(binary, structure=np.ones((3, 3), int))
        return n + 1, regions, np.bincount(regions.ravel(), minlength=n + 1)
    n_labels, regions, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    return n_labels, regions, stats[:, cv2.CC_STAT_AREA]


def remove_small_regions(
    mask: np.ndarray, area_thresh: float, mode: str
) -> tuple[np.ndarray, bool]:
    """Fills holes ("holes") or removes islands ("islands") smaller than area_thresh from a bool
    (H, W) mask (8-connectivity); if every island is small the largest is kept.
    Returns (mask, changed)."""
    if mode not in ("holes", "islands"):
        raise ValueError(f"mode must be 'holes' or 'islands', got {mode!r}")
    correct_holes = mode == "holes"
    working_mask = (correct_holes ^ np.asarray(mask, bool)).astype(np.uint8)
    n_labels, regions, sizes = _label_components(working_mask)
    sizes = sizes[1:]
    small_regions = [i + 1 for i, s in enumerate(sizes) if s < area_thresh]
    if not small_regions:
        return mask, False
    fill_labels = [0] + small_regions
    if not correct_holes:
        fill_labels = [i for i in range(n_labels) if i not in fill_labels]
        if not fill_labels:
            fill_labels = [int(np.argmax(sizes)) + 1]
    return np.isin(regions, fill_labels), True
