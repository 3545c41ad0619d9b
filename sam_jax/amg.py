"""Automatic mask generation over image files, as the official scripts/amg.py does it: reading
images, loading a model for a command, writing masks (PNGs + metadata.csv, or COCO RLE json).

The command is `sam-jax-amg` (sam_jax/cli/amg.py); `python -m sam_jax.amg` runs it too.
`load_image`, `load_model` and `device_context` are shared with sam_jax.predict.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import nullcontext
from typing import Any

import numpy as np

METADATA_HEADER = (
    "id,area,bbox_x0,bbox_y0,bbox_w,bbox_h,point_input_x,point_input_y,predicted_iou,"
    "stability_score,crop_box_x0,crop_box_y0,crop_box_w,crop_box_h"
)


def load_image(path: str) -> np.ndarray | None:
    """uint8 (H, W, 3) RGB image (EXIF orientation applied), or None if it cannot be read."""
    try:
        import cv2
    except ImportError:
        cv2 = None
    if cv2 is not None:
        image = cv2.imread(path)  # BGR; None when unreadable
        return None if image is None else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError):
        return None


def load_model(checkpoint: str, model_type: str | None = None):
    """(model, params) from a .pth or converted directory; model_type checks a .pth's shapes."""
    import sam_jax
    from sam_jax import checkpoints
    from sam_jax.modeling import build_sam

    if model_type is not None and os.path.isfile(checkpoint):
        config, params = checkpoints.load_pth(checkpoint, model_type=model_type)
        return build_sam(config), params
    return sam_jax.load(checkpoint)


def device_context(device: str | None):
    """A `jax.default_device` context for a platform name (cuda is an alias of gpu)."""
    if device is None:
        return nullcontext()
    import jax

    platform = {"cuda": "gpu"}.get(device.lower(), device.lower())
    try:
        return jax.default_device(jax.devices(platform)[0])
    except RuntimeError as e:
        raise ValueError(f"device {device!r} is not available: {str(e).splitlines()[0]}") from None


def list_images(input_path: str) -> list[str]:
    """[input_path] for a file; the files of a folder (not hidden, not sub-folders), sorted."""
    if not os.path.isdir(input_path):
        return [input_path]
    names = sorted(f for f in os.listdir(input_path) if not f.startswith("."))
    return [
        os.path.join(input_path, f) for f in names if os.path.isfile(os.path.join(input_path, f))
    ]


def output_names(image_paths: list[str]) -> list[str]:
    """The output name of each image: its name without extension, or with the extension when
    two images share a stem (a.jpg and a.png in one folder)."""
    names, used = [], set()
    for path in image_paths:
        base = os.path.splitext(os.path.basename(path))[0]
        if base in used:
            base = os.path.basename(path).replace(".", "_")
        used.add(base)
        names.append(base)
    return names


def write_masks_to_folder(masks: list[dict[str, Any]], path: str) -> None:
    """Writes <i>.png (0/255) per mask and metadata.csv, as the official script."""
    from PIL import Image

    metadata = [METADATA_HEADER]
    for i, mask_data in enumerate(masks):
        mask = mask_data["segmentation"]
        Image.fromarray(mask.astype(np.uint8) * 255).save(os.path.join(path, f"{i}.png"))
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
    with open(os.path.join(path, "metadata.csv"), "w") as f:
        f.write("\n".join(metadata))


def write_masks(masks: list[dict[str, Any]], output_dir: str, name: str, output_mode: str) -> str:
    """Writes one image's masks under output_dir: a folder `name/` of PNGs and metadata.csv
    ("binary_mask"), or `name.json` of COCO RLE records ("coco_rle"); returns the path."""
    base = os.path.join(output_dir, name)
    if output_mode == "binary_mask":
        os.makedirs(base, exist_ok=True)
        write_masks_to_folder(masks, base)
        return base
    with open(base + ".json", "w") as f:
        json.dump(masks, f)
    return base + ".json"


if __name__ == "__main__":  # `python -m sam_jax.amg`: the sam-jax-amg command
    from sam_jax.cli.amg import main

    sys.exit(main(prog="python -m sam_jax.amg"))
