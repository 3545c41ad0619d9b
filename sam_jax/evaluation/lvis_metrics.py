"""LVIS v1 mask AP (the federated evaluation of Gupta et al. 2019) on pycocotools' COCOeval.

LVIS is annotated federatedly: for each image, the categories known present (those with a ground
truth instance), those verified absent (`neg_category_ids`) and those not exhaustively annotated
(`not_exhaustive_category_ids`). Its evaluation differs from COCO's in three rules, applied here
around COCOeval's own matching and accumulation (which LVIS's evaluator copies):
1. at most 300 detections per image (the highest scores, over all categories);
2. a detection of a category neither present in nor verified absent from its image is dropped
   (nothing is known about it);
3. an unmatched detection of a not-exhaustively annotated category of its image is ignored
   (neither true nor false positive).
AP averages precision over IoU 0.5:0.05:0.95, 101 recall points and the categories with ground
truth; APr / APc / APf over the rare / common / frequent categories; APs / APm / APl by area.

The `lvis` package (lvis-api 0.5.3, 2020) is not used: it calls `np.float`, removed in numpy 1.24,
and requires opencv-python, which clashes with the opencv-python-headless the generator uses.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np

LVIS_FREQUENCIES = {"r": "rare", "c": "common", "f": "frequent"}
LVIS_MAX_DETS = 300


def check_lvis_categories(coco_gt, what: str) -> None:
    """Raises ValueError unless every category has an LVIS frequency (f, c or r) and every image
    its federated label lists."""
    cats = coco_gt.dataset.get("categories") or []
    bad = [c.get("id") for c in cats if c.get("frequency") not in LVIS_FREQUENCIES]
    if bad or not cats:
        raise ValueError(
            f"{what} is not an LVIS file: categories need a 'frequency' of f, c or r "
            f"(missing for ids {bad[:5]})"
        )
    keys = ("neg_category_ids", "not_exhaustive_category_ids")
    if not all(all(k in im for k in keys) for im in coco_gt.dataset["images"]):
        raise ValueError(f"{what} is not an LVIS file: images need {' and '.join(keys)}")


def federated_filter(coco_gt, results: list[dict], max_dets: int = LVIS_MAX_DETS) -> list[dict]:
    """Rules 1 and 2 of the module docstring: the detections LVIS evaluates."""
    by_image: dict[int, list[dict]] = {}
    for r in results:
        by_image.setdefault(int(r["image_id"]), []).append(r)
    present: dict[int, set] = {}
    for a in coco_gt.dataset["annotations"]:
        present.setdefault(int(a["image_id"]), set()).add(int(a["category_id"]))
    kept = []
    for image_id, dets in by_image.items():
        dets = sorted(dets, key=lambda d: -float(d["score"]))[:max_dets]
        known = present.get(image_id, set()) | {
            int(c) for c in coco_gt.imgs[image_id].get("neg_category_ids", ())
        }
        kept += [d for d in dets if int(d["category_id"]) in known]
    return kept


def lvis_mask_ap(coco_gt, results: list[dict], image_ids, max_dets: int = LVIS_MAX_DETS) -> dict:
    """LVIS mask AP of instance-segmentation results.

    Args:
      coco_gt: pycocotools COCO of an LVIS annotation file (`check_lvis_categories`).
      results: {"image_id", "category_id", "segmentation" (RLE), "score"} dicts.
      image_ids: the images evaluated.
    Returns:
      {"AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf"} fractions; None where no
      category of the group has ground truth.
    """
    from pycocotools.cocoeval import COCOeval

    names = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")
    dets = federated_filter(coco_gt, results, max_dets)
    if not dets:
        return {n: 0.0 for n in names}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes([dict(d) for d in dets])
        ev = COCOeval(coco_gt, coco_dt, iouType="segm")
        ev.params.imgIds = sorted(int(i) for i in image_ids)
        ev.params.maxDets = [max_dets]
        ev.evaluate()
        for e in ev.evalImgs:  # rule 3
            if e is None:
                continue
            image = coco_gt.imgs[e["image_id"]]
            if e["category_id"] in set(image.get("not_exhaustive_category_ids", ())):
                e["dtIgnore"] = np.logical_or(e["dtIgnore"], e["dtMatches"] == 0)
        ev.accumulate()
    precision = ev.eval["precision"][..., 0]  # (T, R, K, A)
    thresholds = ev.params.iouThrs

    def mean(s):
        s = s[s > -1]
        return float(s.mean()) if s.size else None

    freq = [coco_gt.cats[c].get("frequency") for c in ev.params.catIds]
    out = {
        "AP": mean(precision[..., 0]),
        "AP50": mean(precision[np.isclose(thresholds, 0.5)][..., 0]),
        "AP75": mean(precision[np.isclose(thresholds, 0.75)][..., 0]),
        "APs": mean(precision[..., 1]),
        "APm": mean(precision[..., 2]),
        "APl": mean(precision[..., 3]),
    }
    for f in LVIS_FREQUENCIES:
        k = [i for i, g in enumerate(freq) if g == f]
        out[f"AP{f}"] = mean(precision[:, :, k, 0]) if k else None
    return out
