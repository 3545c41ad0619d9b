"""Mask IoU, mIoU aggregation and the COCO mask-AP wrapper (pycocotools' COCOeval).

Metric values are fractions in [0, 1] everywhere in code and in results.json; tables multiply by
100 as the paper does.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def mask_iou(pred, gt):
    """Intersection over union of binary masks: the one IoU of evaluation and training.

    Args:
      pred: bool (..., H, W).
      gt: bool (..., H, W), broadcastable against `pred`.
    Returns:
      (...); 1.0 where both masks are empty (nothing to disagree on). numpy in, float64 numpy
      out (host); jax in, float32 jax out (jit-able; training wraps it in stop_gradient).
    """
    xp = jnp if isinstance(pred, jax.Array) or isinstance(gt, jax.Array) else np
    pred = xp.asarray(pred, dtype=bool)
    gt = xp.asarray(gt, dtype=bool)
    if pred.shape[-2:] != gt.shape[-2:]:
        raise ValueError(f"mask sizes differ: {pred.shape[-2:]} vs {gt.shape[-2:]}")
    inter = xp.count_nonzero(pred & gt, axis=(-2, -1))
    union = xp.count_nonzero(pred | gt, axis=(-2, -1))
    return xp.where(union > 0, inter / xp.maximum(union, 1), 1.0)


def mean_iou(ious: Iterable[float]) -> float | None:
    """Mean of per-mask IoUs; None (not 0) when there is none."""
    values = np.asarray(list(ious), dtype=np.float64)
    return float(values.mean()) if values.size else None


def dataset_average(values: Sequence[float | None]) -> float | None:
    """Average of per-dataset metrics, as the paper reports it; datasets without the metric
    (None) are left out; None when no dataset has it."""
    present = [float(v) for v in values if v is not None]
    return float(np.mean(present)) if present else None


def encode_rle(mask: np.ndarray) -> dict:
    """COCO RLE of a bool (H, W) mask with `counts` as a str (JSON-serialisable)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


_AP_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def coco_mask_ap(coco_gt, results: list[dict], image_ids: Sequence[int] | None = None) -> dict:
    """COCO mask AP of instance-segmentation results.

    Args:
      coco_gt: a pycocotools.coco.COCO with the ground truth.
      results: COCO result dicts {"image_id", "category_id", "segmentation" (RLE), "score"}.
      image_ids: images to evaluate over (default: all images of `coco_gt`). Images without any
        result still count for recall.
    Returns:
      {"AP", "AP50", "AP75", "APs", "APm", "APl"} as fractions (COCOeval's stats[0:6]); None
      where COCO reports -1 (no ground truth of that size), so it never reads as a score.
    """
    from pycocotools.cocoeval import COCOeval

    if not results:
        raise ValueError("no mask results to score: the detections gave no box for these images")
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="segm")
        if image_ids is not None:
            evaluator.params.imgIds = sorted(int(i) for i in image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = evaluator.stats[:6]
    return {name: None if v < 0 else float(v) for name, v in zip(_AP_NAMES, stats, strict=True)}
