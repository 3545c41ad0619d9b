"""Per-group point-prompt mIoU with confidence intervals (SAM paper Table 2).

Table 2 reports, per group of people (perceived gender presentation, age group, skin tone), the
mIoU at 1 and at 3 points of the interactive protocol with random first points, with 95%
confidence intervals. Here the groups are the values of any annotation field: `group_labels`
reads FIELD of each mask's annotation in a COCO or LVIS-format file (e.g. an attribute stored
with each annotation), or, when the annotation lacks it, of the annotation's category
(`name`, `frequency`, `supercategory`, ...); `category_id` works as is.

Confidence interval: a percentile bootstrap over masks (resampling each group's masks with
replacement, 1000 times, seeded), the 2.5th and 97.5th percentiles of the resampled mIoU.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np

from sam_jax import paths
from sam_jax.data import DatasetSpec
from sam_jax.data.records import rle_masks_from_segmentations

GROUP_KINDS = ("coco", "lvis")
BOOTSTRAP_SAMPLES = 1000
CONFIDENCE = 0.95


def _value_text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def group_labels(spec: DatasetSpec, field: str) -> dict[str, list[str]]:
    """{image id: [FIELD of each mask the dataset reader yields for it, in its order]}.

    The reader's mask list is reproduced with its own rules (crowd annotations skipped unless
    include_crowd; undecodable or zero-area segmentations dropped, by the same check). Values are
    strings (JSON for non-strings). Raises ValueError (one line) for a dataset kind without
    annotation fields or an annotation whose FIELD is missing from it and from its category.
    """
    if spec.kind not in GROUP_KINDS:
        raise ValueError(
            f"grouping needs annotation fields: a {' or '.join(GROUP_KINDS)} dataset, got "
            f"{spec.kind!r}"
        )
    try:
        data = json.loads(paths.read_bytes(spec.path))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{spec.path!r} is not valid JSON ({e})") from None
    cats = {c.get("id"): c for c in data.get("categories") or [] if isinstance(c, dict)}
    include_crowd = spec.option("include_crowd", "0") == "1"
    sizes = {im["id"]: (int(im["height"]), int(im["width"])) for im in data["images"]}
    out: dict[str, list[str]] = {str(i): [] for i in sizes}
    for n, a in enumerate(data["annotations"]):
        image_id = a["image_id"]
        if image_id not in sizes or (a.get("iscrowd", 0) and not include_crowd):
            continue
        kept = rle_masks_from_segmentations([a["segmentation"]], sizes[image_id], "", None)
        if len(kept) == 0:
            continue
        if field in a:
            value = a[field]
        elif field in cats.get(a.get("category_id"), {}):
            value = cats[a["category_id"]][field]
        else:
            raise ValueError(
                f"annotation {a.get('id', n)} (image {image_id}) has no field {field!r}, nor has "
                "its category"
            )
        out[str(image_id)].append(_value_text(value))
    return out


def bootstrap_ci(
    values: np.ndarray,
    seed: int,
    samples: int = BOOTSTRAP_SAMPLES,
    confidence: float = CONFIDENCE,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of float (M,) values: (low, high)."""
    values = np.asarray(values, np.float64)
    rng = np.random.default_rng(seed)
    means = np.empty(samples)
    chunk = max(1, 2_000_000 // max(1, len(values)))
    for s in range(0, samples, chunk):
        k = min(chunk, samples - s)
        means[s : s + k] = values[rng.integers(0, len(values), (k, len(values)))].mean(axis=1)
    alpha = (1.0 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(low), float(high)


def group_miou(
    per_mask: dict,
    labels: dict[str, list[str]],
    num_points: Sequence[int],
    field: str,
    seed: int = 0,
    samples: int = BOOTSTRAP_SAMPLES,
) -> dict:
    """mIoU per group after each number of points, with bootstrap confidence intervals.

    Args:
      per_mask: `evaluate_points(..., return_per_mask=True)["per_mask"]`: image_id (M,) list,
        mask_index int (M,), ious float (M, T).
      labels: `group_labels` of the dataset.
      num_points: report these numbers of points (each <= T).
    Returns:
      {"field", "interval": description, "groups": {value: {"num_masks", "miou": {str(n): f},
      "ci": {str(n): [low, high]}}}} with groups sorted by value.
    """
    ids, index, ious = per_mask["image_id"], per_mask["mask_index"], per_mask["ious"]
    try:
        values = [labels[str(i)][int(j)] for i, j in zip(ids, index, strict=True)]
    except (KeyError, IndexError):
        raise ValueError(
            "the annotation fields do not line up with the evaluated masks (the annotation file "
            "changed during the evaluation?)"
        ) from None
    values = np.asarray(values, dtype=object)
    groups = {}
    for g_i, g in enumerate(sorted(set(values.tolist()))):
        rows = np.flatnonzero(values == g)
        entry = {"num_masks": int(len(rows)), "miou": {}, "ci": {}}
        for n in num_points:
            x = ious[rows, int(n) - 1]
            entry["miou"][str(n)] = float(x.mean())
            entry["ci"][str(n)] = list(bootstrap_ci(x, seed + 7919 * g_i + int(n), samples))
        groups[g] = entry
    return {
        "field": field,
        "interval": f"{CONFIDENCE:.0%} percentile bootstrap over masks, {samples} resamples, "
        f"seed {seed}",
        "groups": groups,
    }
