"""Per-group point-prompt mIoU with confidence intervals (SAM paper Table 2).

Table 2 reports, per group of people (perceived gender presentation, age group, skin tone), the
mIoU at 1 and at 3 points of the interactive protocol with random first points, with 95%
confidence intervals. Here the groups are the values of any annotation field (`group_values`):
  - COCO / LVIS: FIELD of each mask's annotation (e.g. an attribute stored with each
    annotation), or, when the annotation lacks it, of the annotation's category (`name`,
    `frequency`, `supercategory`, ...); `category_id` works as is;
  - SA-1B: FIELD of each mask's annotation in its image's JSON (`area`, `predicted_iou`,
    `stability_score`, `crop_box`, ...; SA-1B has no categories). Only the evaluated images'
    JSONs are read.
Values are grouped as they are (non-strings by their JSON text), or, for numbers, binned
(`FIELD:BINS`, `parse_group_by`): `coco` (COCO's area ranges: small < 32^2 <= medium < 96^2 <=
large), `qN` (N quantile bins of the evaluated masks' values, e.g. q4), or ascending edges
`e1,e2,...` (bins (-inf, e1), [e1, e2), ..., [ek, inf)). Without BINS, `area` takes `coco` and
`predicted_iou` / `stability_score` take `q4` (`DEFAULT_BINS`); any other field is as it is.

Confidence interval: a percentile bootstrap over masks (resampling each group's masks with
replacement, 1000 times, seeded), the 2.5th and 97.5th percentiles of the resampled mIoU.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from sam_jax import paths
from sam_jax.data import DatasetSpec
from sam_jax.data.records import rle_masks_from_segmentations
from sam_jax.data.sources import open_source

GROUP_KINDS = ("coco", "lvis", "sa1b")
BOOTSTRAP_SAMPLES = 1000
CONFIDENCE = 0.95
COCO_AREAS = (32.0**2, 96.0**2)  # COCOeval's small / medium / large area boundaries
COCO_AREA_NAMES = ("small", "medium", "large")
DEFAULT_BINS = {"area": "coco", "predicted_iou": "q4", "stability_score": "q4"}
MAX_QUANTILE_BINS = 20


def _value_text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def parse_group_by(text: str) -> tuple[str, str | None]:
    """ "FIELD" or "FIELD:BINS" -> (field, bins): BINS as given ("coco", "qN", "e1,e2,..."),
    DEFAULT_BINS[field] when not given, None (values as they are) for "values" or another
    field. ValueError (one line) for malformed bins."""
    field, _, bins = text.partition(":")
    if not field:
        raise ValueError(f"--group-by needs a field name, got {text!r}")
    if not bins:
        return field, DEFAULT_BINS.get(field)
    if bins == "values":
        return field, None
    _bin_rule(bins)  # checks it
    return field, bins


def _bin_rule(bins: str) -> tuple[str, Any]:
    """("coco", None), ("quantiles", N) or ("edges", (e1, ..., ek)) of a BINS text."""
    if bins == "coco":
        return "coco", None
    if bins[:1] == "q" and bins[1:].isdigit():
        n = int(bins[1:])
        if not 2 <= n <= MAX_QUANTILE_BINS:
            raise ValueError(f"quantile bins must be q2 .. q{MAX_QUANTILE_BINS}, got {bins!r}")
        return "quantiles", n
    try:
        edges = tuple(float(e) for e in bins.split(","))
    except ValueError:
        edges = ()
    if not edges or not all(map(math.isfinite, edges)) or list(edges) != sorted(set(edges)):
        raise ValueError(
            f"bins must be coco, qN (quantiles) or increasing numbers e1,e2,..., got {bins!r}"
        )
    return "edges", edges


def _number(x: float) -> str:
    return "inf" if x == math.inf else "-inf" if x == -math.inf else f"{x:g}"


def bin_values(
    values: Sequence[Any], bins: str, field: str = "value"
) -> tuple[list[str], list[str], list[float]]:
    """Numbers (M,) -> their bins' labels (M strings; "small [0, 1024)", "q2 [0.85, 0.9)",
    "[0.8, 0.9)", ...), every bin's label in order (K), and the bins' edges (K + 1). Quantile
    edges come from `values` themselves (equal edges merged; the last bin is closed). ValueError
    (one line) for a value that is not a number."""
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"--group-by {field}:{bins} bins numbers, but a value is {v!r}")
    x = np.asarray(values, np.float64)
    kind, arg = _bin_rule(bins)
    if kind == "quantiles":
        edges = np.unique(np.quantile(x, np.linspace(0, 1, arg + 1))) if len(x) else np.zeros(1)
        edges = np.repeat(edges, 2) if len(edges) == 1 else edges  # one value: one bin
        inner = edges[1:-1]
        labels = [
            f"q{k + 1} [{_number(edges[k])}, {_number(edges[k + 1])}"
            + ("]" if k == len(edges) - 2 else ")")
            for k in range(len(edges) - 1)
        ]
    else:
        inner = np.asarray(COCO_AREAS if kind == "coco" else arg)
        edges = np.concatenate([[0.0 if kind == "coco" else -math.inf], inner, [math.inf]])
        names = COCO_AREA_NAMES if kind == "coco" else [""] * (len(edges) - 1)
        labels = [
            f"{n} [{_number(lo)}, {_number(hi)})".strip()
            for n, lo, hi in zip(names, edges[:-1], edges[1:], strict=True)
        ]
    index = np.searchsorted(inner, x, side="right")
    return [labels[int(k)] for k in index], labels, [float(e) for e in edges]


def group_values(
    spec: DatasetSpec, field: str, image_ids: Iterable[str] | None = None
) -> dict[str, list[Any]]:
    """{image id: [FIELD of each mask the dataset reader yields for it, in its order]}, the values
    as the annotation JSON holds them.

    The reader's mask list is reproduced with its own rules (COCO: crowd annotations skipped
    unless include_crowd; undecodable or zero-area segmentations dropped, by the same check).
    image_ids: the images wanted (SA-1B reads only their JSONs; default every image). Raises
    ValueError (one line) for a dataset kind without annotation fields or an annotation whose
    FIELD is missing (from it and from its category).
    """
    if spec.kind not in GROUP_KINDS:
        raise ValueError(
            f"grouping needs annotation fields: a {', '.join(GROUP_KINDS)} dataset, got "
            f"{spec.kind!r}"
        )
    if spec.kind == "sa1b":
        return _sa1b_values(spec, field, image_ids)
    try:
        data = json.loads(paths.read_bytes(spec.path))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{spec.path!r} is not valid JSON ({e})") from None
    cats = {c.get("id"): c for c in data.get("categories") or [] if isinstance(c, dict)}
    include_crowd = spec.option("include_crowd", "0") == "1"
    sizes = {im["id"]: (int(im["height"]), int(im["width"])) for im in data["images"]}
    out: dict[str, list[Any]] = {str(i): [] for i in sizes}
    for n, a in enumerate(data["annotations"]):
        image_id = a["image_id"]
        if image_id not in sizes or (a.get("iscrowd", 0) and not include_crowd):
            continue
        if not _kept(a.get("segmentation"), sizes[image_id]):
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
        out[str(image_id)].append(value)
    return out


def _kept(segmentation, hw: tuple[int, int]) -> bool:
    """Whether the readers keep a segmentation (decodable, of the image's size, not empty)."""
    return len(rle_masks_from_segmentations([segmentation], hw, "", None)) == 1


def _sa1b_values(spec: DatasetSpec, field: str, image_ids) -> dict[str, list[Any]]:
    source = open_source(spec)
    index = {source.image_id(i): i for i in range(len(source))}
    wanted = index if image_ids is None else sorted(set(map(str, image_ids)))
    out: dict[str, list[Any]] = {}
    for image_id in wanted:
        if image_id not in index:
            raise ValueError(f"sa1b: no image {image_id!r} under {spec.path!r}")
        meta = source.metadata(index[image_id])
        image = meta.get("image") if isinstance(meta.get("image"), dict) else {}
        values = out[image_id] = []
        for n, a in enumerate(meta["annotations"]):
            seg = a.get("segmentation") if isinstance(a, dict) else None
            hw = (image.get("height"), image.get("width"))
            if hw[0] is None and isinstance(seg, dict):
                hw = tuple(seg.get("size") or (0, 0))
            if not _kept(seg, (int(hw[0] or 0), int(hw[1] or 0))):
                continue
            if field not in a:
                raise ValueError(
                    f"annotation {a.get('id', n)} (image {image_id}) has no field {field!r}"
                )
            values.append(a[field])
    return out


def group_labels(spec: DatasetSpec, field: str) -> dict[str, list[str]]:
    """`group_values` as strings (JSON for non-strings): the groups of values taken as they are."""
    return {k: [_value_text(v) for v in vs] for k, vs in group_values(spec, field).items()}


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
    labels: dict[str, list[Any]],
    num_points: Sequence[int],
    field: str,
    seed: int = 0,
    samples: int = BOOTSTRAP_SAMPLES,
    bins: str | None = None,
) -> dict:
    """mIoU per group after each number of points, with bootstrap confidence intervals.

    Args:
      per_mask: `evaluate_points(..., return_per_mask=True)["per_mask"]`: image_id (M,) list,
        mask_index int (M,), ious float (M, T).
      labels: `group_values` (or `group_labels`) of the dataset.
      num_points: report these numbers of points (each <= T).
      bins: None (each value its group, by its text) or a BINS text of `bin_values` (numbers
        binned; quantiles over the evaluated masks).
    Returns:
      {"field", "interval": description, "groups": {value: {"num_masks", "miou": {str(n): f},
      "ci": {str(n): [low, high]}}}, "bins": {"bins", "edges"} or None}; groups sorted by value,
      bins in their order (empty bins left out).
    """
    ids, index, ious = per_mask["image_id"], per_mask["mask_index"], per_mask["ious"]
    try:
        values = [labels[str(i)][int(j)] for i, j in zip(ids, index, strict=True)]
    except (KeyError, IndexError):
        raise ValueError(
            "the annotation fields do not line up with the evaluated masks (the annotation file "
            "changed during the evaluation?)"
        ) from None
    binning = None
    if bins is None:
        values = [_value_text(v) for v in values]
        order = sorted(set(values))
    else:
        values, every_bin, edges = bin_values(values, bins, field)
        order = [b for b in every_bin if b in set(values)]
        binning = {"bins": bins, "edges": edges}
    values = np.asarray(values, dtype=object)
    groups = {}
    for g_i, g in enumerate(order):
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
        "bins": binning,
    }
