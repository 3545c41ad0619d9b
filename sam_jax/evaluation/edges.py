"""Zero-shot edge detection (SAM paper 7.2, D.2) and its BSDS500 evaluation.

SAM's edge map of an image (`sam_edge_map`), in the paper's words and order:
1. prompt SAM with a 16 x 16 regular grid of foreground points (the automatic generator's grid,
   `amg.masks.build_point_grid`), 3 masks per point: 768 masks; no predicted-IoU or stability
   filter;
2. remove redundant masks by NMS: box NMS over the masks' boxes, ranked by predicted IoU, at the
   automatic generator's default threshold 0.7 (the paper does not give it); empty masks go;
3. Sobel filter of each remaining mask's unthresholded probability map (sigmoid of the logits at
   the image size), kept only on the mask's outer boundary: the pixels outside the mask (logits
   <= 0) 8-adjacent to it (the morphological outer boundary, dilation minus the mask);
4. pixel-wise max over the masks, linearly normalised to [0, 1] (divided by its maximum);
5. edge NMS to thin the edges: the structured-edge NMS of Dollár's toolbox (non-maximum
   suppression across the edge orientation, r=1, s=5, m=1.01) as compiled by pyEdgeEval, the
   standard thinning of BSDS edge maps before evaluation.
The evaluation (`evaluate_edges`) scores the maps against the human boundaries of a BSDS500 split
with `boundaries.py` (ODS, OIS, AP, R50 at 99 thresholds, tolerance 0.0075 of the diagonal).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from sam_jax.amg.masks import batched_mask_to_box, batched_nms, build_point_grid
from sam_jax.data.bsds import iterate_boundaries
from sam_jax.evaluation import boundaries

EDGE_POINTS_PER_SIDE = 16
EDGE_NMS_THRESH = 0.7


def _gather_one(obj):
    return [obj]


def outer_boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels outside a bool (H, W) mask that touch it (8-neighbourhood): bool (H, W)."""
    from scipy import ndimage

    mask = np.asarray(mask, bool)
    return ndimage.binary_dilation(mask, structure=np.ones((3, 3), bool)) & ~mask


def sobel_magnitude(prob: np.ndarray) -> np.ndarray:
    """Gradient magnitude of a float (H, W) map with 3 x 3 Sobel kernels (edges replicated)."""
    from scipy import ndimage

    prob = np.asarray(prob, np.float64)
    gx = ndimage.sobel(prob, axis=1, mode="nearest")
    gy = ndimage.sobel(prob, axis=0, mode="nearest")
    return np.hypot(gx, gy)


def edge_nms(edge_map: np.ndarray) -> np.ndarray:
    """Thin edges of a float (H, W) map in [0, 1] by NMS across their orientation (pyEdgeEval's
    build of Dollár's edgesNms, r=1, s=5, m=1.01)."""
    try:
        from pyEdgeEval.preprocess import fast_nms
    except ImportError:
        raise ImportError("edge NMS needs pyEdgeEval: pip install 'sam_jax[edges]'") from None
    return np.asarray(fast_nms(np.asarray(edge_map, np.float64), r=1, s=5, m=1.01), np.float64)


def sam_edge_map(
    predictor,
    image: np.ndarray,
    points_per_side: int = EDGE_POINTS_PER_SIDE,
    nms_thresh: float = EDGE_NMS_THRESH,
    batch_size: int = 64,
    thin: bool = True,
) -> tuple[np.ndarray, dict[str, int]]:
    """SAM's edge map of a uint8 (H, W, 3) image (see the module docstring).

    Returns (edge map float64 (H, W) in [0, 1], {"num_masks", "num_kept"}). With thin=False the
    map before edge NMS.
    """
    predictor.set_image(np.asarray(image))
    h, w = image.shape[:2]
    points = build_point_grid(points_per_side) * np.array([w, h], np.float64)
    edges, boxes, scores = [], [], []  # per mask: (flat indices, values) on its outer boundary
    for s in range(0, len(points), batch_size):
        chunk = points[s : s + batch_size].astype(np.float32)[:, None, :]
        logits, iou, _ = predictor.predict_batch(
            point_coords=chunk,
            point_labels=np.ones(chunk.shape[:2], np.int32),
            multimask_output=True,
            return_logits=True,
        )
        logits, iou = np.asarray(logits, np.float32), np.asarray(iou, np.float32)
        for b in range(logits.shape[0]):
            for c in range(logits.shape[1]):
                mask = logits[b, c] > 0.0
                if not mask.any():
                    continue
                ring = np.flatnonzero(outer_boundary(mask))
                prob = 1.0 / (1.0 + np.exp(-logits[b, c].astype(np.float64)))
                edges.append((ring, sobel_magnitude(prob).reshape(-1)[ring]))
                boxes.append(batched_mask_to_box(mask))
                scores.append(float(iou[b, c]))
    num_masks = len(points) * 3
    out = np.zeros(h * w)
    kept = np.zeros(0, np.int64)
    if boxes:
        kept = batched_nms(np.stack(boxes), np.asarray(scores), np.zeros(len(boxes)), nms_thresh)
        for k in kept:
            ring, values = edges[int(k)]
            np.maximum.at(out, ring, values)
    out = out.reshape(h, w)
    peak = out.max()
    if peak > 0:
        out = out / peak
    if thin and peak > 0:
        out = np.clip(edge_nms(out), 0.0, 1.0)
    return out, {"num_masks": num_masks, "num_kept": int(len(kept))}


def evaluate_edges(
    edge_fn: Callable[[np.ndarray], np.ndarray],
    root: str,
    split: str = "test",
    num_thresholds: int = boundaries.DEFAULT_THRESHOLDS,
    max_dist: float = boundaries.MAX_DIST,
    matcher: str = "bsds",
    max_images: int | None = None,
    progress: bool = False,
    process_index: int = 0,
    process_count: int = 1,
    all_gather: Callable[[Any], list] = _gather_one,
) -> dict:
    """Edge maps of a BSDS500 split scored by the benchmark's metrics.

    Args:
      edge_fn: uint8 (H, W, 3) image -> float (H, W) edge map in [0, 1] (e.g. a closure over
        `sam_edge_map`).
      root: the BSDS500 folder (images/, groundTruth/); split: train, val or test.
      matcher: "bsds" (the benchmark's correspondence) or "exact" (see boundaries.py).
      process_index, process_count, all_gather: several processes each score their share of the
        images (i::count); the counts of all are summed, as one process would.
    Returns:
      {"edges": {"ODS", "OIS", "AP", "R50", "ODS_threshold", ...}, "num_images",
      "skipped_images", "protocol": {...}, "timing": {...}} (fractions).
    """
    t = boundaries.thresholds(num_thresholds)
    stats: dict = {}
    records = iterate_boundaries(root, split, max_images, stats, process_index, process_count)
    if progress:
        from tqdm import tqdm

        records = tqdm(records, desc="edges", unit="img", disable=None)  # terminals only
    counts, first = [], None
    start = time.perf_counter()
    for rec in records:
        edge_map = np.asarray(edge_fn(rec.image), np.float64)
        if edge_map.shape != rec.image.shape[:2]:
            raise ValueError(f"edge map {edge_map.shape} != image size {rec.image.shape[:2]}")
        counts.append(boundaries.image_counts(edge_map, rec.boundaries, t, max_dist, matcher))
        if first is None:
            first = time.perf_counter() - start
    seconds = time.perf_counter() - start
    parts = all_gather((counts, int(stats.get("skipped_images", 0)), seconds, first))
    counts = [c for p in parts for c in p[0]]
    skipped = sum(p[1] for p in parts)
    seconds = max(p[2] for p in parts)
    if not counts:
        raise ValueError(f"no readable BSDS500 image in {root!r} ({split}); {skipped} skipped")
    metrics = boundaries.boundary_metrics(t, counts)
    return {
        "edges": metrics,
        "num_images": len(counts),
        "skipped_images": skipped,
        "protocol": {
            "thresholds": num_thresholds,
            "max_dist": max_dist,
            "matcher": matcher,
            "split": split,
        },
        "timing": {
            "seconds": seconds,
            "first_image_seconds": parts[0][3],
            "images_per_s": len(counts) / seconds if seconds > 0 else None,
        },
    }
