"""Prompted segmentation of one image from the command line.

    python -m sam_jax.predict --checkpoint CKPT --image IMAGE --output DIR \\
        [--point X,Y[,LABEL] ...] [--box X0,Y0,X1,Y1] [--no-multimask-output]

Points are in pixels of the original image; LABEL is 1 (foreground, the default) or 0
(background). Writes DIR/mask_<i>.png (0/255) for every output mask, DIR/overlay.png (the image
with the best mask tinted and the prompts drawn) and DIR/scores.json (predicted IoU and area per
mask, the best mask and the prompts). Multimask output defaults to on for a single point without
a box, as the official notebooks recommend. Exit code 1 when the image cannot be read.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from sam_jax.amg import device_context, load_image, load_model

MASK_COLOR = np.array([30, 144, 255], np.float32)


def _numbers(text: str, count: tuple[int, ...], what: str) -> list[float]:
    parts = text.split(",")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = None
    if values is None or len(values) not in count or not np.all(np.isfinite(values)):
        raise argparse.ArgumentTypeError(f"bad {what} {text!r}")
    return values


def parse_point(text: str) -> tuple[float, float, int]:
    """'X,Y' or 'X,Y,LABEL' (LABEL 1 foreground, 0 background)."""
    values = _numbers(text, (2, 3), "point (expected X,Y or X,Y,LABEL)")
    label = 1 if len(values) == 2 else values[2]
    if label not in (0, 1):
        raise argparse.ArgumentTypeError(f"point label must be 0 or 1, got {text!r}")
    return values[0], values[1], int(label)


def parse_box(text: str) -> tuple[float, float, float, float]:
    """'X0,Y0,X1,Y1' with X0 <= X1 and Y0 <= Y1."""
    x0, y0, x1, y1 = _numbers(text, (4,), "box (expected X0,Y0,X1,Y1)")
    if x1 < x0 or y1 < y0:
        raise argparse.ArgumentTypeError(f"box {text!r} must have X0 <= X1 and Y0 <= Y1")
    return x0, y0, x1, y1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sam_jax.predict", description="Segments one image from point/box prompts."
    )
    parser.add_argument("--checkpoint", required=True, help="Official .pth or converted dir.")
    parser.add_argument("--model-type", default=None, help="Optional check of a .pth's shapes.")
    parser.add_argument("--image", required=True, help="The image to segment.")
    parser.add_argument("--output", required=True, help="Folder for masks, overlay and scores.")
    parser.add_argument(
        "--point", type=parse_point, action="append", default=[], help="X,Y[,LABEL]; repeatable."
    )
    parser.add_argument("--box", type=parse_box, default=None, help="X0,Y0,X1,Y1.")
    parser.add_argument(
        "--multimask-output",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Three masks instead of one (default: on for a single point without a box).",
    )
    parser.add_argument("--device", default=None, help="JAX platform (cpu, gpu, tpu).")
    return parser


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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.point and args.box is None:
        parser.error("give at least one --point or a --box")
    image = load_image(args.image)
    if image is None:
        print(f"Could not load '{args.image}' as an image.", file=sys.stderr)
        print("Done: 0 of 1 images processed, 1 failed.")
        return 1
    from PIL import Image

    from sam_jax.predictor import SamPredictor

    multimask = args.multimask_output
    if multimask is None:
        multimask = len(args.point) == 1 and args.box is None
    coords = np.array([p[:2] for p in args.point], np.float64) if args.point else None
    labels = np.array([p[2] for p in args.point], np.int32) if args.point else None
    box = None if args.box is None else np.array(args.box, np.float64)
    try:
        with device_context(args.device):
            model, params = load_model(args.checkpoint, args.model_type)
            predictor = SamPredictor(model, params)
            predictor.set_image(image)
            masks, scores, _ = predictor.predict(
                point_coords=coords, point_labels=labels, box=box, multimask_output=multimask
            )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    masks, scores = np.asarray(masks, bool), np.asarray(scores, np.float64)
    os.makedirs(args.output, exist_ok=True)
    records = []
    for i, (mask, score) in enumerate(zip(masks, scores, strict=True)):
        name = f"mask_{i}.png"
        Image.fromarray(mask.astype(np.uint8) * 255).save(os.path.join(args.output, name))
        records.append({"file": name, "predicted_iou": float(score), "area": int(mask.sum())})
    best = int(np.argmax(scores))
    Image.fromarray(overlay(image, masks[best], args.point, args.box)).save(
        os.path.join(args.output, "overlay.png")
    )
    summary = {
        "image": args.image,
        "points": [[x, y] for x, y, _ in args.point],
        "labels": [label for _, _, label in args.point],
        "box": None if args.box is None else list(args.box),
        "multimask_output": multimask,
        "masks": records,
        "best": best,
    }
    with open(os.path.join(args.output, "scores.json"), "w") as f:
        json.dump(summary, f, indent=2)
    for r in records:
        print(f"{r['file']}: predicted_iou={r['predicted_iou']:.4f} area={r['area']}")
    print(f"Done: 1 of 1 images processed, 0 failed. Best mask: mask_{best}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
