"""A picture of predictions on held-out images (written at the end of training).

One row per image, for its largest mask: the image with the ground truth outlined, the
prediction after 1 click and after N clicks (the evaluation clicker: centre click, then RITM
corrections, most confident mask, no mask prompt), with clicks drawn as dots (green positive,
red negative) and each panel titled with its IoU.
"""

from __future__ import annotations

import io
import posixpath
from typing import Any

import numpy as np

from sam_jax import SamPredictor, paths
from sam_jax.evaluation.figures import predict_with_clicks
from sam_jax.evaluation.metrics import mask_iou
from sam_jax.images import tint


def save_prediction_figure(
    model: Any,
    params: Any,
    examples: list[dict],
    path: str,
    num_images: int = 6,
    num_clicks: int = 5,
) -> str:
    """Writes a PNG grid of predictions on `examples` (uint8 images with bool masks) to path
    (local or a URL; the format follows the extension, PNG by default)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    predictor = SamPredictor(model, params)
    examples = [ex for ex in examples if len(ex["masks"])][:num_images]
    fig, axes = plt.subplots(len(examples), 3, figsize=(9, 3 * len(examples)), squeeze=False)
    for row, ex in zip(axes, examples, strict=True):
        image, masks = np.asarray(ex["image"]), np.asarray(ex["masks"], bool)
        gt = masks[int(np.argmax(masks.reshape(len(masks), -1).sum(1)))]
        predictor.set_image(image)
        rounds = predict_with_clicks(predictor, gt, num_clicks)
        row[0].imshow(tint(image, gt, (255, 255, 0)))
        row[0].contour(gt, levels=[0.5], colors="yellow", linewidths=0.8)
        row[0].set_title("ground truth")
        for ax, (pred, clicks, labels), n in zip(
            row[1:], (rounds[0], rounds[-1]), (1, num_clicks), strict=True
        ):
            ax.imshow(tint(image, pred, (0, 120, 255)))
            ax.contour(gt, levels=[0.5], colors="yellow", linewidths=0.8)
            colors = np.where(labels[:, None] == 1, [[0, 1, 0]], [[1, 0, 0]])
            ax.scatter(clicks[:, 0], clicks[:, 1], c=colors, s=25, edgecolors="white")
            iou = float(mask_iou(pred, gt))
            ax.set_title(f"{n} click{'s' if n > 1 else ''}: IoU {iou:.2f}")
        for ax in row:
            ax.axis("off")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format=posixpath.splitext(str(path))[1].lstrip(".").lower() or "png", dpi=80)
    plt.close(fig)
    paths.write_bytes(path, buf.getvalue())
    return path
