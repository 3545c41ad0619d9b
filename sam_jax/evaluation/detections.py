"""Zero-shot instance segmentation (SAM paper 7.4, D.4): masks from a detector's boxes, scored as
COCO mask AP, or LVIS mask AP (federated, with rare / common / frequent groups) on an LVIS file.

Inputs: the ground-truth annotation file (COCO, or LVIS v1), its images folder, and the detector's
boxes as a COCO results JSON: a list of {"image_id": int, "category_id": int, "bbox": [x, y, w,
h], "score": float} (the paper used ViTDet-H's). Each box (XYWH -> XYXY) prompts the predictor.
D.4: "We apply an additional mask refinement iteration by feeding the most confident predicted
mask, together with the box prompt, back to the mask decoder to produce the final prediction."
So, with refine=True (the default): pass 1 decodes the box with 3 outputs and takes the one of
highest predicted IoU ("the most confident predicted mask"); pass 2 decodes the box again with
that mask's low-res logits as the mask prompt and a single output, which is the final mask. With
refine=False, one single-output pass (what this module did before). The mask keeps the
detector's category and score. On LVIS only the 300 best-scored boxes of an image are prompted
(LVIS scores at most 300 detections per image). Images of the annotation file without a
detection still count (their objects are misses); images that cannot be read are skipped,
counted and left out. Paths may be local or URLs (gs://bucket/...): files are read through
`sam_jax.paths`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
from collections.abc import Sequence

import numpy as np

from sam_jax import paths
from sam_jax.data.coco import image_entry_path
from sam_jax.evaluation.lvis_metrics import LVIS_MAX_DETS, check_lvis_categories, lvis_mask_ap
from sam_jax.evaluation.metrics import coco_mask_ap, encode_rle
from sam_jax.evaluation.protocol import predict_masks
from sam_jax.images import decode_image


def _read_json(path: str, what: str):
    try:
        return json.loads(paths.read_text(path))
    except FileNotFoundError:
        raise ValueError(f"{what} {path!r} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{what} {path!r} is not readable JSON: {e}") from None


def load_coco_gt(annotation_file: str):
    """pycocotools COCO of a ground-truth file, after checking it is COCO instance format."""
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    data = _read_json(annotation_file, "COCO annotation file")
    keys = ("images", "annotations", "categories")
    missing = [k for k in keys if not isinstance(data, dict) or k not in data]
    if missing:
        raise ValueError(
            f"{annotation_file!r} is not a COCO annotation file (missing {', '.join(missing)})"
        )
    ann_keys = {"image_id", "category_id", "segmentation"}
    if not all(isinstance(a, dict) and ann_keys <= set(a) for a in data["annotations"]) or not all(
        isinstance(im, dict)
        and {"id", "height", "width"} <= set(im)
        and ("file_name" in im or "coco_url" in im)
        for im in data["images"]
    ):
        raise ValueError(
            f"{annotation_file!r} is not a COCO instance file: images need id, file_name (or "
            "LVIS's coco_url), height and width; annotations need image_id, category_id and "
            "segmentation"
        )
    for i, a in enumerate(data["annotations"]):
        a.setdefault("id", i + 1)
        a.setdefault("iscrowd", 0)
    coco = COCO()
    with contextlib.redirect_stdout(io.StringIO()):
        coco.dataset = data
        coco.createIndex()
    for a in coco.dataset["annotations"]:
        if "area" not in a:
            a["area"] = float(mask_utils.area(coco.annToRLE(a)))
    return coco


def load_detections(detections, coco_gt) -> dict[int, list[dict]]:
    """Detections (path to a COCO results JSON, or its list) grouped by image id."""
    if isinstance(detections, (str, os.PathLike)):
        detections = _read_json(os.fspath(detections), "detections file")
    if not isinstance(detections, list) or not detections:
        raise ValueError("detections must be a non-empty COCO results list")
    by_image: dict[int, list[dict]] = {}
    for d in detections:
        if not (
            isinstance(d, dict)
            and {"image_id", "bbox", "score", "category_id"} <= set(d)
            and len(d["bbox"]) == 4
        ):
            raise ValueError(
                "detections must be COCO results: each needs image_id, category_id, "
                f"bbox [x, y, w, h] and score; got {str(d)[:80]}"
            )
        by_image.setdefault(int(d["image_id"]), []).append(d)
    unknown = sorted(set(by_image) - set(coco_gt.imgs))
    if unknown:
        raise ValueError(f"detections name images not in the annotation file: {unknown[:5]}")
    return by_image


def read_image_at(images_dir: str, image: dict) -> np.ndarray | None:
    """uint8 (H, W, 3) RGB of a COCO / LVIS `images` entry; None if it cannot be read."""
    try:
        return decode_image(paths.read_bytes(image_entry_path(images_dir, image)))
    except (OSError, ValueError):  # PIL's UnidentifiedImageError is an OSError
        return None


def box_masks(predictor, boxes: np.ndarray, refine: bool = True) -> np.ndarray:
    """Final masks bool (B, H, W) of XYXY boxes (B, 4) on the image set on `predictor`: with
    refine, D.4's two passes (see the module docstring), else one single-output pass."""
    if not refine:
        masks, _, _ = predict_masks(predictor, boxes=boxes, multimask_output=False)
        return masks[:, 0]
    _, iou, low_res = predict_masks(predictor, boxes=boxes, multimask_output=True)
    best = np.argmax(iou, axis=1)
    mask_input = low_res[np.arange(len(boxes)), best][:, None].astype(np.float32)
    masks, _, _ = predict_masks(
        predictor, boxes=boxes, mask_input=mask_input, multimask_output=False
    )
    return masks[:, 0]


def evaluate_detections(
    predictor,
    annotation_file: str,
    images_dir: str,
    detections,
    max_images: int | None = None,
    batch_size: int = 32,
    progress: bool = False,
    refine: bool = True,
    lvis: bool = False,
) -> dict:
    """Mask AP of SAM masks prompted by detector boxes.

    Args:
      predictor: set_image / predict_batch interface (see protocol.py).
      annotation_file: COCO instances JSON, or an LVIS v1 file with lvis=True (ground truth).
      images_dir: folder of the images named by the annotation file.
      detections: path to a COCO results JSON with boxes, or the loaded list.
      max_images: evaluate only the first N images by id.
      refine: D.4's refinement pass (module docstring).
      lvis: LVIS's federated AP (+ APr / APc / APf) instead of COCO's.
    Returns:
      {"mask_ap": {"AP", "AP50", "AP75", "APs", "APm", "APl"[, "APr", "APc", "APf"]},
      "num_images", "num_detections", "skipped_images", "timing": {...}}.
    """

    coco = load_coco_gt(annotation_file)
    if lvis:
        check_lvis_categories(coco, repr(annotation_file))
    by_image = load_detections(detections, coco)
    image_ids: Sequence[int] = sorted(coco.imgs)[:max_images]
    results, evaluated, skipped = [], [], 0
    iterator = image_ids
    if progress:
        from tqdm import tqdm

        iterator = tqdm(image_ids, desc="detections", unit="img", disable=None)  # terminals only
    start = time.perf_counter()
    for image_id in iterator:
        dets = by_image.get(int(image_id), [])
        if lvis:
            dets = sorted(dets, key=lambda d: -float(d["score"]))[:LVIS_MAX_DETS]
        if not dets:
            evaluated.append(image_id)
            continue
        image = read_image_at(images_dir, coco.imgs[image_id])
        if image is None:
            skipped += 1
            continue
        evaluated.append(image_id)
        predictor.set_image(image)
        xywh = np.array([d["bbox"] for d in dets], dtype=np.float32)
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        for s in range(0, len(dets), batch_size):
            masks = box_masks(predictor, boxes[s : s + batch_size], refine)
            for d, m in zip(dets[s : s + batch_size], masks, strict=True):
                results.append(
                    {
                        "image_id": int(image_id),
                        "category_id": int(d["category_id"]),
                        "segmentation": encode_rle(m),
                        "score": float(d["score"]),
                    }
                )
    seconds = time.perf_counter() - start
    if not evaluated:
        raise ValueError(f"no readable images among {len(image_ids)} in {images_dir!r}")
    score = lvis_mask_ap if lvis else coco_mask_ap
    return {
        "mask_ap": score(coco, results, evaluated),
        "num_images": len(evaluated),
        "num_detections": len(results),
        "skipped_images": skipped,
        "timing": {
            "seconds": seconds,
            "images_per_s": len(evaluated) / seconds if seconds > 0 else None,
            "masks_per_s": len(results) / seconds if seconds > 0 else None,
        },
    }
