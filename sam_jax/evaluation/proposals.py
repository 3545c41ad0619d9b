"""Zero-shot object proposals (SAM paper 7.3, D.3): mask AR@1000 on COCO or LVIS-format data.

Proposals come from the automatic mask generator (its public API), modified as D.3 says: no
crops, no predicted-IoU or stability filter (thresholds 0 turn them off), a 64 x 64 point grid,
box NMS 0.9; when an image has more than 1000 masks they are ranked by the average of predicted
IoU and stability score and the top 1000 are kept (that average is every proposal's score).

Average recall (`mask_average_recall`): class-agnostic, pooled over all ground-truth instances
(pycocotools' COCOeval with useCats=0: each image's proposals are matched greedily, by descending
score, to its instances at each IoU threshold 0.5:0.05:0.95; recall is averaged over the
thresholds), at the max_proposals best proposals per image, for all / small / medium / large
objects (COCO areas: < 32^2, 32^2..96^2, > 96^2). On an LVIS file the frequency groups are
measured, as D.3 says, "against a ground truth set containing just the corresponding LVIS
categories": AR of frequent (f), common (c) and rare (r) categories. LVIS annotations have no
crowd flag (treated as 0).
"""

from __future__ import annotations

import contextlib
import copy
import io
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from sam_jax.evaluation.detections import load_coco_gt, read_image_at
from sam_jax.evaluation.lvis_metrics import LVIS_FREQUENCIES, check_lvis_categories
from sam_jax.evaluation.metrics import encode_rle

PROPOSAL_POINTS_PER_SIDE = 64
PROPOSAL_NMS_THRESH = 0.9
MAX_PROPOSALS = 1000


def _gather_one(obj):
    return [obj]


def rank_proposals(records: list[dict], max_proposals: int = MAX_PROPOSALS) -> list[dict]:
    """The automatic generator's records ranked by mean(predicted_iou, stability_score),
    best first, at most max_proposals; each gets that mean as "score"."""
    scored = []
    for r in records:
        score = 0.5 * (float(r["predicted_iou"]) + float(r["stability_score"]))
        scored.append({**r, "score": score})
    scored.sort(key=lambda r: -r["score"])
    return scored[:max_proposals]


def _run_coco_eval(coco_gt, results, image_ids, max_proposals: int) -> dict:
    from pycocotools.cocoeval import COCOeval

    names = ("AR", "ARs", "ARm", "ARl")
    if not coco_gt.dataset["annotations"]:
        return dict.fromkeys(names)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(copy.deepcopy(results)) if results else None
        if coco_dt is None:  # no proposal at all: recall 0 wherever there is ground truth
            return {n: 0.0 for n in names}
        ev = COCOeval(coco_gt, coco_dt, iouType="segm")
        ev.params.useCats = 0
        ev.params.imgIds = sorted(int(i) for i in image_ids)
        ev.params.maxDets = [max_proposals]  # evaluate() sorts the list: keep one
        ev.evaluate()
        ev.accumulate()
    recall = ev.eval["recall"]  # (T, K=1, A, M): -1 where an area range has no instance
    out = {}
    for name, a in zip(names, range(4), strict=True):
        r = recall[:, :, a, -1]
        r = r[r > -1]
        out[name] = float(r.mean()) if r.size else None
    return out


def _subset_gt(data: dict, keep_ann: Callable[[dict], bool]):
    from pycocotools.coco import COCO

    sub = dict(data)
    sub["annotations"] = [a for a in data["annotations"] if keep_ann(a)]
    coco = COCO()
    with contextlib.redirect_stdout(io.StringIO()):
        coco.dataset = sub
        coco.createIndex()
    return coco


def mask_average_recall(
    coco_gt, results: list[dict], image_ids, max_proposals: int = MAX_PROPOSALS, lvis: bool = False
) -> dict:
    """Class-agnostic mask AR at max_proposals (see the module docstring).

    Args:
      coco_gt: pycocotools COCO of the ground truth (COCO or LVIS file).
      results: {"image_id", "segmentation" (RLE), "score"} proposals (category ignored).
      image_ids: the images evaluated (images without proposals count as misses).
      lvis: also the frequency groups (needs categories with "frequency" f / c / r).
    Returns:
      {"AR", "ARs", "ARm", "ARl"} (+ "ARf", "ARc", "ARr" with lvis), fractions; None where no
      instance falls in the group.
    """
    results = [{**r, "category_id": r.get("category_id", 1)} for r in results]
    out = _run_coco_eval(coco_gt, results, image_ids, max_proposals)
    if lvis:
        freq = {c["id"]: c.get("frequency") for c in coco_gt.dataset["categories"]}
        for f in LVIS_FREQUENCIES:
            sub = _subset_gt(coco_gt.dataset, lambda a, f=f: freq.get(a["category_id"]) == f)
            out[f"AR{f}"] = _run_coco_eval(sub, results, image_ids, max_proposals)["AR"]
    return out


def evaluate_proposals(
    generate: Callable[[np.ndarray], list[dict]],
    annotation_file: str,
    images_dir: str,
    lvis: bool = False,
    max_proposals: int = MAX_PROPOSALS,
    max_images: int | None = None,
    progress: bool = False,
    process_index: int = 0,
    process_count: int = 1,
    all_gather: Callable[[Any], list] = _gather_one,
) -> dict:
    """Mask AR@max_proposals of automatic masks on a COCO or LVIS-format dataset.

    Args:
      generate: uint8 (H, W, 3) image -> automatic-generator records (segmentation as a bool
        (H, W) array or a COCO RLE dict, predicted_iou, stability_score), e.g.
        `SamAutomaticMaskGenerator(...).generate`.
      annotation_file, images_dir: the ground truth and its images (LVIS: coco_url layout).
      lvis: LVIS file (frequency groups); max_images: the first N images by id.
    Returns:
      {"proposals": {"AR", "ARs", "ARm", "ARl"[, "ARf", "ARc", "ARr"]}, "num_images",
      "num_proposals", "proposals_per_image", "skipped_images", "protocol", "timing"}.
    """
    coco = load_coco_gt(annotation_file)
    if lvis:
        check_lvis_categories(coco, repr(annotation_file))
    image_ids = sorted(coco.imgs)[:max_images]
    mine = image_ids[process_index::process_count]
    if progress:
        from tqdm import tqdm

        mine = tqdm(mine, desc="proposals", unit="img", disable=None)  # terminals only
    results, evaluated, skipped = [], [], 0
    start = time.perf_counter()
    for image_id in mine:
        image = read_image_at(images_dir, coco.imgs[image_id])
        if image is None:
            skipped += 1
            continue
        evaluated.append(image_id)
        for r in rank_proposals(generate(image), max_proposals):
            seg = r["segmentation"]
            rle = encode_rle(seg) if isinstance(seg, np.ndarray) else seg
            results.append({"image_id": int(image_id), "segmentation": rle, "score": r["score"]})
    seconds = time.perf_counter() - start
    parts = all_gather((results, evaluated, skipped, seconds))
    results = [r for p in parts for r in p[0]]
    evaluated = sorted(i for p in parts for i in p[1])
    skipped = sum(p[2] for p in parts)
    seconds = max(p[3] for p in parts)
    if not evaluated:
        raise ValueError(f"no readable images among {len(image_ids)} in {images_dir!r}")
    return {
        "proposals": mask_average_recall(coco, results, evaluated, max_proposals, lvis),
        "num_images": len(evaluated),
        "num_proposals": len(results),
        "proposals_per_image": len(results) / len(evaluated),
        "skipped_images": skipped,
        "protocol": {"max_proposals": max_proposals, "lvis": lvis},
        "timing": {
            "seconds": seconds,
            "images_per_s": len(evaluated) / seconds if seconds > 0 else None,
        },
    }
