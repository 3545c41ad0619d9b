"""A picture of predictions on held-out images (written at the end of training).

One row per image, for its largest mask: the image with the ground truth outlined, the
prediction after 1 click and after N clicks (the evaluation clicker: centre click, then RITM
corrections, most confident mask, no mask prompt), with clicks drawn as dots (green positive,
red negative) and each panel titled with its IoU.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _overlay(image: np.ndarray, mask: np.ndarray, color) -> np.ndarray:
    out = image.astype(np.float32).copy()
    out[mask] = 0.45 * out[mask] + 0.55 * np.asarray(color, np.float32)
    return out.astype(np.uint8)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def predict_with_clicks(predictor, gt: np.ndarray, num_clicks: int):
    """Runs the evaluation clicker for one mask; returns [(mask, clicks (k, 2), labels (k,))]."""
    from sam_jax.evaluation import first_click, next_click

    clicks = [first_click(gt, "center")]
    labels = [1]
    out = []
    for t in range(num_clicks):
        masks, iou, _ = predictor.predict(
            point_coords=np.asarray(clicks, np.float32),
            point_labels=np.asarray(labels, np.int32),
            multimask_output=t == 0,
        )
        pred = masks[int(np.argmax(iou))]
        out.append((pred, np.asarray(clicks), np.asarray(labels)))
        clicked = np.zeros(gt.shape, bool)
        for x, y in clicks:
            clicked[y, x] = True
        nxt = next_click(gt, pred, clicked)
        if nxt is None:
            out += [out[-1]] * (num_clicks - t - 1)
            break
        clicks.append(nxt[:2])
        labels.append(nxt[2])
    return out


def save_prediction_figure(
    model: Any,
    params: Any,
    examples: list[dict],
    path: str,
    num_images: int = 6,
    num_clicks: int = 5,
) -> str:
    """Writes a PNG grid of predictions on `examples` (uint8 images with bool masks) to path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sam_jax import SamPredictor

    predictor = SamPredictor(model, params)
    examples = [ex for ex in examples if len(ex["masks"])][:num_images]
    fig, axes = plt.subplots(len(examples), 3, figsize=(9, 3 * len(examples)), squeeze=False)
    for row, ex in zip(axes, examples, strict=True):
        image, masks = np.asarray(ex["image"]), np.asarray(ex["masks"], bool)
        gt = masks[int(np.argmax(masks.reshape(len(masks), -1).sum(1)))]
        predictor.set_image(image)
        rounds = predict_with_clicks(predictor, gt, num_clicks)
        row[0].imshow(_overlay(image, gt, (255, 255, 0)))
        row[0].contour(gt, levels=[0.5], colors="yellow", linewidths=0.8)
        row[0].set_title("ground truth")
        for ax, (pred, clicks, labels), n in zip(
            row[1:], (rounds[0], rounds[-1]), (1, num_clicks), strict=True
        ):
            ax.imshow(_overlay(image, pred, (0, 120, 255)))
            ax.contour(gt, levels=[0.5], colors="yellow", linewidths=0.8)
            colors = np.where(labels[:, None] == 1, [[0, 1, 0]], [[1, 0, 0]])
            ax.scatter(clicks[:, 0], clicks[:, 1], c=colors, s=25, edgecolors="white")
            ax.set_title(f"{n} click{'s' if n > 1 else ''}: IoU {_iou(pred, gt):.2f}")
        for ax in row:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
