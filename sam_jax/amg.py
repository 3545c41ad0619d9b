"""Automatic mask generation on an image or a folder of images (the official scripts/amg.py).

    python -m sam_jax.amg --checkpoint CKPT --input IMAGE_OR_DIR --output DIR [options]

CKPT is an official .pth or a converted sam_jax directory. For each image, writes a folder
DIR/<image name>/ of masks as PNGs (0/255) and a metadata.csv, or with --convert-to-rle one
DIR/<image name>.json of COCO RLE records. Unreadable images are reported and skipped; the exit
code is 1 when any image failed. Flags and outputs follow the official script; --crop-overlap-ratio
takes a float (the official script declares it as an int by mistake).
"""

from __future__ import annotations

import argparse
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
AMG_FLAGS = {  # flag -> (type, help)
    "points_per_side": (int, "Sample a grid over the image with this many points to a side."),
    "points_per_batch": (int, "How many input points to decode in one batch."),
    "pred_iou_thresh": (float, "Exclude masks with a predicted score below this threshold."),
    "stability_score_thresh": (float, "Exclude masks with a stability score below this."),
    "stability_score_offset": (float, "Larger values perturb the mask more for stability."),
    "box_nms_thresh": (float, "The overlap threshold for excluding a duplicate mask."),
    "crop_n_layers": (int, "If >0, also run on crops of the image, at this many scales."),
    "crop_nms_thresh": (float, "The overlap threshold for duplicates across crops."),
    "crop_overlap_ratio": (float, "Larger numbers mean image crops overlap more."),
    "crop_n_points_downscale_factor": (int, "Points per side in crop layer n shrink by this**n."),
    "min_mask_region_area": (int, "Remove holes and islands smaller than this many pixels."),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sam_jax.amg",
        description=(
            "Runs automatic mask generation on an input image or directory of images, and "
            "outputs masks as either PNGs or COCO-style RLEs."
        ),
    )
    parser.add_argument("--input", required=True, help="An image or a folder of images.")
    parser.add_argument(
        "--output",
        required=True,
        help="Output folder: a folder of PNGs per image, or one COCO RLE json per image.",
    )
    parser.add_argument(
        "--model-type",
        default=None,
        help="vit_b, vit_l, vit_h or default (= vit_h). Optional: the architecture is read "
        "from the checkpoint; when given, a .pth must match it.",
    )
    parser.add_argument(
        "--checkpoint", required=True, help="An official SAM .pth or a converted directory."
    )
    parser.add_argument(
        "--device",
        default=None,
        help="JAX platform (cpu, gpu/cuda, tpu); default: JAX's.",
    )
    parser.add_argument(
        "--convert-to-rle",
        action="store_true",
        help="Save masks as COCO RLEs in one json per image instead of a folder of PNGs.",
    )
    group = parser.add_argument_group("AMG Settings")
    for name, (kind, help_text) in AMG_FLAGS.items():
        group.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=help_text)
    return parser


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


def list_targets(input_path: str) -> list[str]:
    if not os.path.isdir(input_path):
        return [input_path]
    names = sorted(f for f in os.listdir(input_path) if not f.startswith("."))
    return [
        os.path.join(input_path, f) for f in names if os.path.isfile(os.path.join(input_path, f))
    ]


def _progress(items, disable: bool = False):
    try:
        from tqdm import tqdm
    except ImportError:
        return items, print
    bar = tqdm(items, desc="images", unit="img", disable=disable)
    return bar, tqdm.write


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not os.path.exists(args.input):
        parser.error(f"--input {args.input} does not exist")
    amg_kwargs = {k: getattr(args, k) for k in AMG_FLAGS if getattr(args, k) is not None}
    output_mode = "coco_rle" if args.convert_to_rle else "binary_mask"
    targets = list_targets(args.input)
    if not targets:
        parser.error(f"--input folder {args.input} holds no files")
    from sam_jax.automatic_mask_generator import SamAutomaticMaskGenerator

    try:
        with device_context(args.device):
            print("Loading model...")
            model, params = load_model(args.checkpoint, args.model_type)
            generator = SamAutomaticMaskGenerator(
                model, params, output_mode=output_mode, **amg_kwargs
            )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.makedirs(args.output, exist_ok=True)

    failures, used = [], set()
    items, log = _progress(targets)
    with device_context(args.device):
        for t in items:
            image = load_image(t)
            if image is None:
                log(f"Could not load '{t}' as an image, skipping...")
                failures.append(t)
                continue
            try:
                masks = generator.generate(image)
            except ValueError as e:
                log(f"Could not process '{t}': {e}, skipping...")
                failures.append(t)
                continue
            base = os.path.splitext(os.path.basename(t))[0]
            if base in used:  # a.jpg and a.png in one folder
                base = os.path.basename(t).replace(".", "_")
            used.add(base)
            save_base = os.path.join(args.output, base)
            if output_mode == "binary_mask":
                os.makedirs(save_base, exist_ok=True)
                write_masks_to_folder(masks, save_base)
            else:
                with open(save_base + ".json", "w") as f:
                    json.dump(masks, f)
    done = len(targets) - len(failures)
    print(f"Done: {done} of {len(targets)} images processed, {len(failures)} failed.")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
