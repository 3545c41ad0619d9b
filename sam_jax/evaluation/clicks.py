"""Click rules of the zero-shot point protocol (SAM paper 7.1 / D.1, RITM's evaluation clicker).

All masks are boolean (H, W) arrays in original image coordinates; a click is returned as an
(x, y) pair of integer pixel indices (x = column, y = row) plus, for corrections, its label
(1 = positive / foreground, 0 = negative / background).

Rules (deterministic):
- Distance transforms are Euclidean (scipy.ndimage.distance_transform_edt) of the region padded
  with a 1-pixel zero border and cropped back, so pixels on the image edge count as 1 pixel away
  from the boundary, exactly like RITM's `padding=True`.
- First click ("center"): the pixel of the ground truth farthest from its boundary (max of the
  distance transform). "random": a pixel drawn uniformly from the ground-truth pixels.
- Next click (RITM): FN = gt & ~pred and FP = ~gt & pred are each distance-transformed; as in
  RITM the transform of the whole region is computed first and already clicked pixels are then
  zeroed (they stay part of the region, they just cannot be clicked again). The click is positive
  at the FN maximum if max dt_FN > max dt_FP, else negative at the FP maximum (a tie goes to the
  negative click, as in RITM's `is_positive = fn_max > fp_max`).
- Ties between pixels of equal distance: the first pixel in row-major order (np.argmax order,
  smallest y, then smallest x), the same pixel RITM's `np.where(dt == max)[0]` picks.
- No clickable error (prediction perfect, or every error pixel already clicked): `next_click`
  returns None. The protocol then stops adding clicks for that mask and keeps its last IoU for the
  remaining rounds (RITM would place a meaningless negative click at pixel (0, 0)).
"""

from __future__ import annotations

import numpy as np

from sam_jax.amg.masks import batched_mask_to_box


def _cropped_dt(mask: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Distance transform of `mask` within its bounding box: (dt (h, w), y0, x0).

    Equal to the full transform on that box and 0 elsewhere: the 1-pixel zero frame around the
    box is at least as close to any box pixel as any zero pixel beyond it (projection onto a
    box never increases distances), so cropping changes nothing, and it makes small error
    regions of large images cheap.
    """
    from scipy import ndimage

    rows = np.flatnonzero(mask.any(axis=1))
    if len(rows) == 0:
        return np.zeros((0, 0)), 0, 0
    cols = np.flatnonzero(mask.any(axis=0))
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    padded = np.pad(mask[y0:y1, x0:x1], 1, mode="constant", constant_values=False)
    return ndimage.distance_transform_edt(padded)[1:-1, 1:-1], int(y0), int(x0)


def distance_transform(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance of each mask pixel to the nearest non-mask pixel, 1-pixel zero border.

    Args:
      mask: bool (H, W).
    Returns:
      float64 (H, W); 0 outside the mask, >= 1 inside.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    out = np.zeros(mask.shape)
    dt, y0, x0 = _cropped_dt(mask)
    out[y0 : y0 + dt.shape[0], x0 : x0 + dt.shape[1]] = dt
    return out


def _argmax_xy(values: np.ndarray, y0: int = 0, x0: int = 0) -> tuple[int, int]:
    """(x, y) of the first maximum in row-major order (of a crop starting at (y0, x0))."""
    y, x = np.unravel_index(int(np.argmax(values)), values.shape)
    return int(x) + x0, int(y) + y0


def first_click(
    gt_mask: np.ndarray, mode: str = "center", rng: np.random.Generator | None = None
) -> tuple[int, int]:
    """First (positive) click on a ground-truth mask.

    Args:
      gt_mask: bool (H, W), must contain at least one pixel.
      mode: "center" (farthest from the boundary) or "random" (uniform over the mask pixels).
      rng: numpy Generator for mode="random".
    Returns:
      (x, y) pixel indices.
    """
    gt_mask = np.asarray(gt_mask, dtype=bool)
    if gt_mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {gt_mask.shape}")
    if not gt_mask.any():
        raise ValueError("first_click needs a non-empty ground-truth mask")
    if mode == "center":
        return _argmax_xy(*_cropped_dt(gt_mask))
    if mode == "random":
        if rng is None:
            raise ValueError("first_click(mode='random') needs an rng")
        flat = np.flatnonzero(gt_mask)
        y, x = np.unravel_index(int(flat[rng.integers(len(flat))]), gt_mask.shape)
        return int(x), int(y)
    raise ValueError(f"unknown first-point mode {mode!r}; expected 'center' or 'random'")


def _region_max(region: np.ndarray, clicked: np.ndarray | None):
    """(max dt, (x, y) of its first row-major argmax) of a region, clicked pixels zeroed."""
    dt, y0, x0 = _cropped_dt(region)
    if dt.size == 0:
        return 0.0, None
    if clicked is not None:
        dt = np.where(clicked[y0 : y0 + dt.shape[0], x0 : x0 + dt.shape[1]], 0.0, dt)
    return float(dt.max()), _argmax_xy(dt, y0, x0)


def next_click(
    gt_mask: np.ndarray, pred_mask: np.ndarray, clicked: np.ndarray | None = None
) -> tuple[int, int, int] | None:
    """Next corrective click by the RITM rule.

    Args:
      gt_mask: bool (H, W) ground truth.
      pred_mask: bool (H, W) current prediction.
      clicked: optional bool (H, W), True at pixels already clicked.
    Returns:
      (x, y, label) with label 1 (positive, in the false-negative region) or 0 (negative, in the
      false-positive region); None when no error pixel is left to click.
    """
    gt_mask = np.asarray(gt_mask, dtype=bool)
    pred_mask = np.asarray(pred_mask, dtype=bool)
    if gt_mask.shape != pred_mask.shape or gt_mask.ndim != 2:
        raise ValueError(f"gt {gt_mask.shape} and prediction {pred_mask.shape} shapes differ")
    if clicked is not None:
        clicked = np.asarray(clicked, dtype=bool)
    fn_max, fn_xy = _region_max(gt_mask & ~pred_mask, clicked)
    fp_max, fp_xy = _region_max(~gt_mask & pred_mask, clicked)
    if fn_max == 0.0 and fp_max == 0.0:
        return None
    if fn_max > fp_max:
        return (*fn_xy, 1)
    return (*fp_xy, 0)


def mask_to_box(mask: np.ndarray) -> np.ndarray:
    """Tight XYXY box of a mask with inclusive max (torchvision masks_to_boxes / official AMG).

    Args:
      mask: bool (H, W), non-empty.
    Returns:
      float32 (4,) [x0, y0, x1, y1], x1/y1 are the last column/row that contain the mask.
    """
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        raise ValueError("mask_to_box needs a non-empty mask")
    return batched_mask_to_box(mask).astype(np.float32)
