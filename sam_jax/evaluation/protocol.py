"""Zero-shot point and box protocols (SAM paper 7.1, 7.3, D.1) over a narrow predictor interface.

The predictor is anything with
  set_image(image uint8 (H, W, 3))
  predict_batch(point_coords=(B, N, 2) | None, point_labels=(B, N) | None, boxes=(B, 4) | None,
                mask_input=(B, 1, 256, 256) | None, multimask_output=bool, return_logits=False)
      -> masks bool (B, C, H, W), iou (B, C), low_res (B, C, 256, 256)   (numpy, original frame)
e.g. `sam_jax.SamPredictor`, or `sam_jax.evaluation.official.OfficialPredictor` (PyTorch reference).
The image encoder runs once per image; each click round of all masks of an image is one batched
predict_batch call (chunks of `batch_size` masks). The protocol passes the real rows: padding them
to a few shapes (to bound recompilation) is the predictor's job (`SamPredictor` pads to powers of
two >= 8).

Point protocol per mask: click 1 from `first_click`, clicks 2.. from the RITM rule (`next_click`)
on the chosen mask of the previous round; every round prompts with all clicks so far. The chosen
mask is the most confident one (highest predicted IoU). `multimask`: "first" (3 outputs for the
first click, 1 output afterwards, as SAM was trained and as the official predictor recommends),
"always", or "never". `feed_mask=True` also passes the previous round's low-res logits of the
chosen mask as the mask prompt. A mask with no clickable error left keeps its IoU for the
remaining rounds (see clicks.py). Oracle: best of the 3 first-click masks against the ground truth.
Box protocol: one box per ground-truth mask (tight box, inclusive max), single output.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from sam_jax.errors import NoMasksError
from sam_jax.evaluation.clicks import first_click, mask_to_box, next_click
from sam_jax.evaluation.metrics import mask_iou, mean_iou

DEFAULT_NUM_POINTS = (1, 2, 3, 5, 9)
MULTIMASK_MODES = ("first", "always", "never")
FIRST_POINT_MODES = ("center", "random")


def _stable_hash(*parts) -> int:
    """64-bit hash of the parts' text, stable across processes (unlike hash())."""
    text = "/".join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


def _gather_one(obj):
    return [obj]


def select_masks(
    mask_counts: Sequence[tuple[str, int]],
    max_masks: int,
    seed: int = 0,
    all_gather: Callable[[Any], list] = _gather_one,
) -> dict[str, np.ndarray]:
    """Uniform sample of `max_masks` masks out of all (image_id, mask index) pairs.

    mask_counts: (image_id, number of non-empty masks) per image; an index is a position among
    that image's non-empty masks. With several processes, each passes its share of the images
    and `all_gather` (obj -> [obj of every process], e.g. sam_jax.distributed.all_gather).

    Each mask gets the priority hash(seed, image_id, index) and the `max_masks` smallest over all
    processes are kept (a bottom-k sample): deterministic given the seed, independent of the
    reading order and of how the images are split between processes.
    Returns {image_id: sorted int indices of the kept masks} (images with none kept are absent).
    """
    if max_masks <= 0:
        raise ValueError(f"max_masks must be positive, got {max_masks}")
    keys = [(image_id, j) for image_id, n in mask_counts for j in range(int(n))]
    prio = np.array([_stable_hash(seed, i, j) for i, j in keys], dtype=np.uint64)
    everything = np.concatenate(all_gather(prio))
    if len(everything) > max_masks:
        threshold = np.partition(everything, max_masks - 1)[max_masks - 1]
        keys = [key for key, p in zip(keys, prio, strict=True) if p <= threshold]
    selected: dict[str, list[int]] = {}
    for image_id, j in keys:
        selected.setdefault(image_id, []).append(j)
    return {k: np.asarray(v, dtype=np.int64) for k, v in selected.items()}


def _predict(predictor, **kwargs):
    """predict_batch with numpy outputs: masks bool (B, C, H, W), iou (B, C), low_res."""
    masks, iou, low_res = predictor.predict_batch(**kwargs)
    return np.asarray(masks).astype(bool, copy=False), np.asarray(iou), np.asarray(low_res)


def run_point_rounds(
    predictor,
    gt_masks: np.ndarray,
    first_clicks: np.ndarray,
    num_rounds: int,
    feed_mask: bool = False,
    multimask: str = "first",
    batch_size: int = 32,
    return_masks: bool = False,
) -> dict[str, np.ndarray]:
    """Interactive point rounds for all masks of the image currently set on `predictor`.

    Args:
      gt_masks: bool (M, H, W), non-empty masks.
      first_clicks: int (M, 2) first (x, y) clicks.
      num_rounds: T, the number of clicks (rounds) per mask.
      return_masks: also return the chosen masks.
    Returns:
      ious float (M, T) IoU of the chosen mask after each round; oracle float (M,) best first-round
      IoU; clicks int (M, T, 2) and labels int (M, T) (rows after `num_clicks` repeat the last
      click); num_clicks int (M,); with return_masks, masks bool (M, T, H, W), the chosen mask after
      each round (a mask with no clickable error left keeps its last one, like its IoU).
    """
    if multimask not in MULTIMASK_MODES:
        raise ValueError(f"unknown multimask mode {multimask!r}; expected one of {MULTIMASK_MODES}")
    gt_masks = np.asarray(gt_masks, dtype=bool)
    m = len(gt_masks)
    out = {
        "ious": np.zeros((m, num_rounds)),
        "oracle": np.zeros(m),
        "clicks": np.zeros((m, num_rounds, 2), dtype=np.int64),
        "labels": np.ones((m, num_rounds), dtype=np.int64),
        "num_clicks": np.ones(m, dtype=np.int64),
    }
    if return_masks:
        out["masks"] = np.zeros((m, num_rounds, *gt_masks.shape[1:]), dtype=bool)
    for start in range(0, m, batch_size):
        sl = slice(start, min(m, start + batch_size))
        gts, clicks, labels = gt_masks[sl], out["clicks"][sl], out["labels"][sl]
        ious, num_clicks, b = out["ious"][sl], out["num_clicks"][sl], len(gt_masks[sl])
        clicks[:, 0] = first_clicks[sl]
        active = np.ones(b, dtype=bool)
        low_res = None
        for t in range(num_rounds):
            multi = multimask == "always" or (multimask == "first" and t == 0)
            masks, iou_pred, low = _predict(
                predictor,
                point_coords=clicks[:, : t + 1].astype(np.float32),
                point_labels=labels[:, : t + 1].astype(np.int32),
                mask_input=low_res if feed_mask else None,
                multimask_output=multi,
            )
            best = np.argmax(iou_pred, axis=1)
            rows = np.arange(b)
            all_ious = mask_iou(masks, gts[:, None])
            ious[:, t] = np.where(active, all_ious[rows, best], ious[:, t - 1] if t else 0.0)
            if t == 0:
                out["oracle"][sl] = all_ious.max(axis=1)
            if return_masks:
                chosen = out["masks"][sl]
                chosen[:, t] = masks[rows, best]
                if t:
                    chosen[~active, t] = chosen[~active, t - 1]
            low_res = low[rows, best][:, None].astype(np.float32)
            if t + 1 == num_rounds:
                break
            clicks[:, t + 1], labels[:, t + 1] = clicks[:, t], labels[:, t]
            for i in np.flatnonzero(active):
                clicked = np.zeros(gts[i].shape, dtype=bool)
                clicked[clicks[i, : t + 1, 1], clicks[i, : t + 1, 0]] = True
                click = next_click(gts[i], masks[i, best[i]], clicked)
                if click is None:
                    active[i] = False
                else:
                    clicks[i, t + 1], labels[i, t + 1] = click[:2], click[2]
                    num_clicks[i] += 1
    return out


def run_box_prompts(predictor, gt_masks: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """IoU (M,) of the single-output mask from each ground-truth mask's tight box."""
    gt_masks = np.asarray(gt_masks, dtype=bool)
    ious = []
    for start in range(0, len(gt_masks), batch_size):
        gts = gt_masks[start : start + batch_size]
        boxes = np.stack([mask_to_box(g) for g in gts])
        masks, _, _ = _predict(predictor, boxes=boxes, multimask_output=False)
        ious.append(mask_iou(masks[:, 0], gts))
    return np.concatenate(ious) if ious else np.zeros(0)


def _reiterate(examples) -> Callable[[], Iterable[dict]]:
    if callable(examples):
        return examples
    if iter(examples) is examples:
        raise ValueError(
            "max_masks needs two passes over the examples: pass a list or a function that returns "
            "a fresh iterator, not a one-shot iterator"
        )
    return lambda: examples


def evaluate_points(
    predictor,
    examples,
    num_points: Sequence[int] = DEFAULT_NUM_POINTS,
    first_point: str = "center",
    feed_mask: bool = False,
    multimask: str = "first",
    gt_boxes: bool = False,
    seed: int = 0,
    max_masks: int | None = None,
    batch_size: int = 32,
    progress: bool = False,
    return_per_mask: bool = False,
    all_gather: Callable[[Any], list] = _gather_one,
) -> dict:
    """Point (and optionally ground-truth box) protocol over a dataset.

    Args:
      predictor: see the module docstring.
      examples: iterable of {"image": uint8 (H, W, 3), "masks": bool (M, H, W), "image_id": str},
        or a function returning a fresh iterator (needed, like a list, when max_masks is set).
      num_points: report mIoU after these numbers of clicks (empty: no point protocol).
      first_point: "center" or "random" (seeded per (seed, image_id, mask index)).
      gt_boxes: also report box mIoU from ground-truth boxes.
      max_masks: evaluate a uniform seeded sample of this many masks (select_masks).
      progress: show a tqdm progress bar over images.
      all_gather: with several processes, each passes its share of the examples and this
        function (obj -> [obj of every process]); the result covers every share, the same on
        every process, equal to one process evaluating everything.
    Returns:
      {"num_images", "num_masks", "num_masks_available", "skipped_empty_masks", "miou": {str(n):
      mIoU}, "oracle_miou_1", "box_miou", "protocol": {...}, "timing": {"seconds",
      "first_image_seconds", "images_per_s", "masks_per_s"}} with metrics as fractions (timing:
      wall time of the evaluation pass, including reading the data and compilation, most of which
      happens on the first image); plus
      "per_mask" (image_id, mask_index, ious (M, T), oracle, box_iou, clicks (M, T, 2), labels)
      when return_per_mask.
    """
    num_points = tuple(sorted({int(n) for n in num_points}))
    if any(n < 1 for n in num_points):
        raise ValueError(f"numbers of points must be >= 1, got {num_points}")
    if first_point not in FIRST_POINT_MODES:
        raise ValueError(f"unknown first-point mode {first_point!r}; expected {FIRST_POINT_MODES}")
    if multimask not in MULTIMASK_MODES:
        raise ValueError(f"unknown multimask mode {multimask!r}; expected one of {MULTIMASK_MODES}")
    if not num_points and not gt_boxes:
        raise ValueError("nothing to evaluate: no numbers of points and no box prompts")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    num_rounds = max(num_points, default=0)

    selected, available = None, None
    if max_masks is not None:
        make_examples = _reiterate(examples)
        counts = [(str(ex["image_id"]), _count_valid(ex["masks"])) for ex in make_examples()]
        available = sum(n for _, n in counts)
        available = sum(all_gather(available))
        selected = select_masks(counts, max_masks, seed, all_gather)
        examples = make_examples()
    elif callable(examples):
        examples = examples()

    per: dict[str, list] = {k: [] for k in ("image_id", "mask_index", "ious", "oracle", "box_iou")}
    per["clicks"], per["labels"] = [], []
    num_images, skipped_empty, total_valid = 0, 0, 0
    if progress:
        from tqdm import tqdm

        total = len(selected) if selected is not None else None
        if total is None and hasattr(examples, "__len__"):
            total = len(examples)
        examples = tqdm(examples, desc="eval", unit="img", total=total)
    start = time.perf_counter()
    first_image_seconds = None
    for ex in examples:
        image_id = str(ex["image_id"])
        gt = np.asarray(ex["masks"], dtype=bool)
        nonempty = gt.reshape(len(gt), -1).any(axis=1) if len(gt) else np.zeros(0, bool)
        skipped_empty += int((~nonempty).sum())
        total_valid += int(nonempty.sum())
        index = np.flatnonzero(nonempty)
        if selected is not None:
            keep = selected.get(image_id, np.zeros(0, dtype=np.int64))
            index = index[keep[keep < len(index)]]
        if len(index) == 0:
            continue
        gt = gt[index]
        predictor.set_image(np.asarray(ex["image"]))
        num_images += 1
        per["image_id"] += [image_id] * len(index)
        per["mask_index"].append(index)
        if num_rounds:
            firsts = np.array(
                [
                    first_click(
                        g, first_point, np.random.default_rng(_stable_hash(seed, image_id, j))
                    )
                    for g, j in zip(gt, index, strict=True)
                ]
            )
            r = run_point_rounds(
                predictor, gt, firsts, num_rounds, feed_mask, multimask, batch_size
            )
            per["ious"].append(r["ious"])
            per["oracle"].append(r["oracle"])
            per["clicks"].append(r["clicks"])
            per["labels"].append(r["labels"])
        if gt_boxes:
            per["box_iou"].append(run_box_prompts(predictor, gt, batch_size))
        if first_image_seconds is None:
            first_image_seconds = time.perf_counter() - start
    seconds = time.perf_counter() - start
    parts = all_gather((per, num_images, skipped_empty, total_valid, seconds, first_image_seconds))
    per = {k: [x for p in parts for x in p[0][k]] for k in per}
    num_images, skipped_empty, total_valid = (sum(p[i] for p in parts) for i in (1, 2, 3))
    seconds = max(p[4] for p in parts)
    first_image_seconds = parts[0][5]

    num_masks = len(per["image_id"])
    if num_masks == 0:
        raise NoMasksError(
            f"no masks to evaluate: {num_images} images with masks, {skipped_empty} empty masks "
            "skipped"
        )
    cat = {k: np.concatenate(v) if v else None for k, v in per.items() if k != "image_id"}
    result = {
        "num_images": num_images,
        "num_masks": num_masks,
        "num_masks_available": available if available is not None else total_valid,
        "skipped_empty_masks": skipped_empty,
        "miou": {str(n): mean_iou(cat["ious"][:, n - 1]) for n in num_points},
        "oracle_miou_1": mean_iou(cat["oracle"]) if num_rounds else None,
        "box_miou": mean_iou(cat["box_iou"]) if gt_boxes else None,
        "protocol": {
            "num_points": list(num_points),
            "first_point": first_point,
            "feed_mask": bool(feed_mask),
            "multimask": multimask,
            "gt_boxes": bool(gt_boxes),
            "seed": int(seed),
            "max_masks": max_masks,
        },
        "timing": {
            "seconds": seconds,
            "first_image_seconds": first_image_seconds,
            "images_per_s": num_images / seconds if seconds > 0 else None,
            "masks_per_s": num_masks / seconds if seconds > 0 else None,
        },
    }
    if return_per_mask:
        result["per_mask"] = {"image_id": per["image_id"], **cat}
    return result


def evaluate_boxes(predictor, examples, **kwargs) -> dict:
    """Ground-truth box protocol only (evaluate_points with no point rounds)."""
    return evaluate_points(predictor, examples, num_points=(), gt_boxes=True, **kwargs)


def _count_valid(masks) -> int:
    masks = np.asarray(masks, dtype=bool)
    return int(masks.reshape(len(masks), -1).any(axis=1).sum()) if len(masks) else 0
