"""Prompted segmentation of one image: the prompts to masks, and the files written for them.

The command is `sam-jax-predict` (sam_jax/cli/predict.py); `python -m sam_jax.predict` runs it
too. `segment` runs the predictor on point/box prompts (multimask output on by default for a
single point without a box, as the official notebooks recommend); `write_prediction` writes
DIR/mask_<i>.png (0/255) for every output mask, DIR/overlay.png (the image with the best mask
tinted and the prompts drawn) and DIR/scores.json (predicted IoU and area per mask, the best
mask and the prompts).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

import numpy as np

from sam_jax.amg import device_context, load_image, load_model  # noqa: F401 - re-exported

MASK_COLOR = np.array([30, 144, 255], np.float32)
Point = tuple[float, float, int]  # x, y (pixels of the original image), label 1 fg / 0 bg
Box = tuple[float, float, float, float]  # x0, y0, x1, y1


def default_multimask(points: Sequence[Point], box: Box | None) -> bool:
    """Three masks for a single point without a box (an ambiguous prompt), else one."""
    return len(points) == 1 and box is None


def segment(
    model,
    params,
    image: np.ndarray,
    points: Sequence[Point] = (),
    box: Box | None = None,
    multimask_output: bool | None = None,
) -> tuple[np.ndarray, np.ndarray, bool]:
    """(masks bool (C, H, W), predicted IoU (C,), multimask_output) for the prompts."""
    from sam_jax.predictor import SamPredictor

    if not points and box is None:
        raise ValueError("give at least one point or a box")
    if multimask_output is None:
        multimask_output = default_multimask(points, box)
    coords = np.array([p[:2] for p in points], np.float64) if points else None
    labels = np.array([p[2] for p in points], np.int32) if points else None
    predictor = SamPredictor(model, params)
    predictor.set_image(image)
    masks, scores, _ = predictor.predict(
        point_coords=coords,
        point_labels=labels,
        box=None if box is None else np.array(box, np.float64),
        multimask_output=multimask_output,
    )
    return np.asarray(masks, bool), np.asarray(scores, np.float64), multimask_output


def overlay(image: np.ndarray, mask: np.ndarray, points, box) -> np.ndarray:
    """The image with `mask` tinted, points drawn (green fg, red bg) and the box outlined."""
    from PIL import Image, ImageDraw

    out = image.astype(np.float32)
    out[mask] = 0.45 * out[mask] + 0.55 * MASK_COLOR
    pil = Image.fromarray(out.round().astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    r = max(2, round(max(image.shape[:2]) / 150))
    for x, y, label in points:
        color = (0, 220, 0) if label == 1 else (230, 0, 0)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=color, outline=(255, 255, 255))
    if box is not None:
        draw.rectangle(list(box), outline=(0, 220, 0), width=max(1, r // 2))
    return np.asarray(pil)


def write_prediction(
    output_dir: str,
    image_path: str,
    image: np.ndarray,
    masks: np.ndarray,
    scores: np.ndarray,
    points: Sequence[Point],
    box: Box | None,
    multimask_output: bool,
) -> dict:
    """Writes the masks, overlay.png and scores.json under output_dir; returns scores.json's
    content ({"masks": [{"file", "predicted_iou", "area"}, ...], "best": index, ...})."""
    from PIL import Image

    os.makedirs(output_dir, exist_ok=True)
    records = []
    for i, (mask, score) in enumerate(zip(masks, scores, strict=True)):
        name = f"mask_{i}.png"
        Image.fromarray(mask.astype(np.uint8) * 255).save(os.path.join(output_dir, name))
        records.append({"file": name, "predicted_iou": float(score), "area": int(mask.sum())})
    best = int(np.argmax(scores))
    Image.fromarray(overlay(image, masks[best], points, box)).save(
        os.path.join(output_dir, "overlay.png")
    )
    summary = {
        "image": image_path,
        "points": [[x, y] for x, y, _ in points],
        "labels": [label for _, _, label in points],
        "box": None if box is None else list(box),
        "multimask_output": multimask_output,
        "masks": records,
        "best": best,
    }
    with open(os.path.join(output_dir, "scores.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


if __name__ == "__main__":  # `python -m sam_jax.predict`: the sam-jax-predict command
    from sam_jax.cli.predict import main

    sys.exit(main(prog="python -m sam_jax.predict"))
