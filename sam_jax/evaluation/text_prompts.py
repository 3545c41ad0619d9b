"""Text-to-mask evaluation (SAM paper 7.5; the `text` task of sam-jax-eval) on data whose masks
have names: the synthetic shapes ("red ring", `sam_jax.data.synthetic`), or COCO / LVIS masks
named by their category in a template (`named_examples`; CLIP's "a photo of a {}." by default).

Each mask whose name is unique in its image is prompted by its name alone (the CLIP text
embedding through SAM's text path; the paper shows this only qualitatively). Beside it, on the
same masks and model: the centre point alone (paper D.1's first click: farthest from the
boundary) and the name with that point (the paper's figure 12: a point fixes a text prompt's
failures). Multimask output for one prompt (text or point), the most confident mask scored, as
the points protocol at one click; `text_oracle` is the best of the three against the ground truth.
`region` prompts with the CLIP *image* embedding of the mask's own crop (what training gives,
without its random expansion and zeroing): the gap between `region` and `text` is what the
image-text gap of the CLIP costs.
Masks whose name appears twice in an image cannot be told apart by name: they are skipped and
counted.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from typing import Any

import numpy as np

from sam_jax import functional as F
from sam_jax.data import DatasetSpec, iterate_examples
from sam_jax.data.sources import synthetic_config
from sam_jax.data.synthetic import SyntheticDataset
from sam_jax.evaluation.clicks import first_click
from sam_jax.evaluation.groups import group_values
from sam_jax.evaluation.metrics import mask_iou, mean_iou
from sam_jax.prompts import ImagePrompts

PROMPTS = ("text", "text_oracle", "point", "text+point", "region")
COCO_TEMPLATE = "a photo of a {}."  # CLIP's zero-shot prompt (Radford et al. 2021, sec. 3.1.4)


def default_template(kind: str) -> str:
    """The phrase of a name on a dataset kind: the synthetic shapes' names as they are (their
    CLIP was trained on them), CLIP's "a photo of a {}." on COCO / LVIS."""
    return "{}" if kind == "synthetic" else COCO_TEMPLATE


def phrase(template: str, name: str) -> str:
    """A name in its template ("{}" where it goes); LVIS's underscores ("baseball_bat") become
    spaces."""
    return template.replace("{}", str(name).replace("_", " "))


def named_examples(
    spec: DatasetSpec,
    split: str,
    template: str,
    max_images: int | None = None,
    stats: dict | None = None,
):
    """The examples of a synthetic, coco or lvis dataset ({"image" uint8 (H, W, 3), "masks" bool
    (M, H, W), "names": M phrases, ...}), every image (no split across processes): the shapes'
    names, or each COCO / LVIS mask's category name lined up with the masks the reader keeps
    (crowd, undecodable and empty annotations dropped), each in `template`. The reader's skips
    are counted in `stats`; ValueError (one line) when names and masks do not line up."""
    if spec.kind == "synthetic":
        dataset = SyntheticDataset(split, synthetic_config(spec, split))
        n = len(dataset) if max_images is None else min(len(dataset), max_images)
        for i in range(n):
            ex = dataset[i]
            yield {**ex, "names": [phrase(template, name) for name in ex["names"]]}
        return
    names = group_values(spec, "name")
    for ex in iterate_examples(spec, split=split, max_images=max_images, stats=stats):
        image_names = names.get(ex["image_id"], [])
        if len(image_names) != len(ex["masks"]):
            raise ValueError(
                f"the category names of image {ex['image_id']} do not line up with its masks "
                "(the annotation file changed during the evaluation?)"
            )
        yield {**ex, "names": [phrase(template, name) for name in image_names]}


def evaluate_text(
    predictor: Any,
    examples: Iterable[dict],
    batch_size: int = 32,
    progress: bool = False,
) -> dict[str, Any]:
    """mIoU of text, centre-point and text+point prompts over `examples` (dicts with "image",
    "masks" (M, H, W) bool and "names" (M strings)). Returns {"num_images", "num_masks",
    "skipped_masks" (names shared in an image), "text_miou": {prompt: mIoU}, "per_name":
    {name: text mIoU}, "timing"}."""
    ious: dict[str, list[float]] = {k: [] for k in PROMPTS}
    per_name: dict[str, list[float]] = {}
    images = skipped = 0
    t0 = time.perf_counter()
    first_image_seconds = None
    it = examples
    if progress:
        from tqdm import tqdm

        it = tqdm(examples, desc="text", unit="image")
    for ex in it:
        counts = Counter(ex["names"])
        keep = [i for i, n in enumerate(ex["names"]) if counts[n] == 1]
        skipped += len(ex["names"]) - len(keep)
        images += 1
        if not keep:
            continue
        predictor.set_image(ex["image"])
        for start in range(0, len(keep), batch_size):
            rows = keep[start : start + batch_size]
            gt = np.asarray(ex["masks"])[rows]
            names = [ex["names"][i] for i in rows]
            points = np.array([[first_click(g)] for g in gt], np.float64)
            labels = np.ones((len(rows), 1), np.int32)
            masks, iou, _ = predictor.predict_batch(texts=names, multimask_output=True)
            text_iou = mask_iou(masks, gt[:, None])  # (P, 3)
            best = text_iou[np.arange(len(rows)), np.argmax(iou, axis=1)]
            ious["text"] += best.tolist()
            ious["text_oracle"] += text_iou.max(axis=1).tolist()
            for name, v in zip(names, best, strict=True):
                per_name.setdefault(name, []).append(float(v))
            masks, iou, _ = predictor.predict_batch(points, labels, multimask_output=True)
            point_iou = mask_iou(masks, gt[:, None])
            ious["point"] += point_iou[np.arange(len(rows)), np.argmax(iou, axis=1)].tolist()
            masks, _, _ = predictor.predict_batch(
                points, labels, texts=names, multimask_output=False
            )
            ious["text+point"] += mask_iou(masks[:, 0], gt).tolist()
            regions = predictor.text_encoder.embed_regions(ex["image"], gt)
            prompts = ImagePrompts.batch(
                predictor.low_res_size, text_embeddings=regions, who="evaluate_text"
            )
            masks, iou, _ = F.decode_image_prompts(
                predictor.model, predictor.params, predictor.features, prompts,
                predictor.original_size, predictor.input_size, True, False,
                predictor.min_batch_bucket,
            )  # fmt: skip
            region_iou = mask_iou(masks, gt[:, None])
            ious["region"] += region_iou[np.arange(len(rows)), np.argmax(iou, axis=1)].tolist()
        if first_image_seconds is None:
            first_image_seconds = time.perf_counter() - t0
    seconds = time.perf_counter() - t0
    num_masks = len(ious["text"])
    return {
        "num_images": images,
        "num_masks": num_masks,
        "skipped_masks": skipped,
        "skipped_images": 0,
        "text_miou": {k: mean_iou(v) for k, v in ious.items()},
        "per_name": {k: mean_iou(v) for k, v in sorted(per_name.items())},
        "timing": {
            "seconds": seconds,
            "images_per_s": images / seconds if seconds else None,
            "masks_per_s": num_masks / seconds if seconds else None,
            "first_image_seconds": first_image_seconds or 0.0,
        },
    }
