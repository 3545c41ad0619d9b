"""The files the commands write: automatic masks as the official scripts/amg.py writes them
(PNGs + metadata.csv, or COCO RLE json) and a prompted prediction (mask PNGs, overlay.png,
scores.json)."""

from __future__ import annotations

import io
import json
import os
import posixpath
from collections.abc import Sequence
from typing import Any

import numpy as np

from sam_jax import images, paths

METADATA_HEADER = (
    "id,area,bbox_x0,bbox_y0,bbox_w,bbox_h,point_input_x,point_input_y,predicted_iou,"
    "stability_score,crop_box_x0,crop_box_y0,crop_box_w,crop_box_h"
)


def output_stems(image_paths: list[str]) -> list[str]:
    """The output name of each image: its stem, or stem_ext for every image whose stem another
    image shares (a.jpg and a.png in one folder give a_jpg and a_png)."""
    stems = [posixpath.splitext(paths.basename(p))[0] for p in image_paths]
    shared = {s for s in stems if stems.count(s) > 1}
    return [
        paths.basename(p).replace(".", "_") if s in shared else s
        for p, s in zip(image_paths, stems, strict=True)
    ]


def png_bytes(image: np.ndarray) -> bytes:
    """PNG file bytes of a uint8 (H, W[, 3]) image or a bool mask (written 0/255)."""
    from PIL import Image

    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def write_masks_to_folder(masks: list[dict[str, Any]], path: str) -> None:
    """Writes <i>.png (0/255) per mask and metadata.csv, as the official script."""
    metadata = [METADATA_HEADER]
    for i, mask_data in enumerate(masks):
        paths.write_bytes(paths.join(path, f"{i}.png"), png_bytes(mask_data["segmentation"]))
        row = [
            str(i),
            str(mask_data["area"]),
            *[str(x) for x in mask_data["bbox"]],
            *[str(x) for x in mask_data["point_coords"][0]],
            str(mask_data["predicted_iou"]),
            str(mask_data["stability_score"]),
            *[str(x) for x in mask_data["crop_box"]],
        ]
        metadata.append(",".join(row))
    paths.write_text(paths.join(path, "metadata.csv"), "\n".join(metadata))


def write_masks(masks: list[dict[str, Any]], output_dir: str, name: str, output_mode: str) -> str:
    """Writes one image's masks under output_dir: a folder `name/` of PNGs and metadata.csv
    ("binary_mask"), or `name.json` of COCO RLE records ("coco_rle"); returns the path. Each
    appears whole or not at all (an interrupted run leaves the previous output of that image)."""
    base = paths.join(output_dir, name)
    if output_mode != "binary_mask":
        paths.write_text(base + ".json", json.dumps(masks))
        return base + ".json"
    if paths.is_remote(base):  # objects appear whole; no folder rename on an object store
        write_masks_to_folder(masks, base)
        return base
    with paths.atomic_output(base, overwrite=True) as tmp:
        os.mkdir(tmp)
        write_masks_to_folder(masks, str(tmp))
    return base


def write_prediction(
    output_dir: str,
    image_path: str,
    image: np.ndarray,
    masks: np.ndarray,
    scores: np.ndarray,
    points: Sequence[tuple[float, float, int]],
    box: Sequence[float] | None,
    multimask_output: bool,
    text: str | None = None,
) -> dict:
    """Writes the masks, overlay.png and scores.json under output_dir; returns scores.json's
    content ({"masks": [{"file", "predicted_iou", "area"}, ...], "best": index, ...})."""

    paths.makedirs(output_dir)
    records = []
    for i, (mask, score) in enumerate(zip(masks, scores, strict=True)):
        name = f"mask_{i}.png"
        paths.write_bytes(paths.join(output_dir, name), png_bytes(np.asarray(mask, bool)))
        records.append({"file": name, "predicted_iou": float(score), "area": int(mask.sum())})
    best = int(np.argmax(scores))
    overlay = images.overlay(image, masks[best], points, box)
    paths.write_bytes(paths.join(output_dir, "overlay.png"), png_bytes(overlay))
    summary = {
        "image": image_path,
        "points": [[x, y] for x, y, _ in points],
        "labels": [label for _, _, label in points],
        "box": None if box is None else list(box),
        **({} if text is None else {"text": text}),
        "multimask_output": multimask_output,
        "masks": records,
        "best": best,
    }
    paths.write_text(paths.join(output_dir, "scores.json"), json.dumps(summary, indent=2))
    return summary
