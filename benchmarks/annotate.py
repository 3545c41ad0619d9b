"""The automatic stage over a folder: `sam_jax.annotate` beside a loop of the official
scripts/amg.py logic (official SamAutomaticMaskGenerator, coco_rle output, one JSON per image),
same images, same random weights, one run. Prints images/s of both and the ratio, writes JSON.

    python benchmarks/annotate.py                              # CPU: vit_b, 4 images, 16x16 grid
    python benchmarks/annotate.py --images 16 --points-per-side 32 --crop-n-layers 2   # a GPU

Images are generated (--height x --width, painted rectangles on noise). Random weights keep no
mask at the paper's thresholds, so both sides time the encoder and decoding, filtering and NMS of
the grid (and writing the JSONs); --relaxed lowers the thresholds so masks are kept and encoded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from host_info import describe  # noqa: E402 (this folder, on sys.path when run as a script)


def _make_images(folder: str, n: int, h: int, w: int) -> list[str]:
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        img = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
        for _ in range(6):
            y, x = rng.integers(0, h - h // 4), rng.integers(0, w - w // 4)
            img[y : y + h // 5, x : x + w // 5] = rng.integers(80, 255, 3)
        path = os.path.join(folder, f"sa_{i + 1}.jpg")
        Image.fromarray(img).save(path, quality=92)
        out.append(path)
    return out


def _official_loop(sam, images: list[str], out: str, settings: dict) -> float:
    """scripts/amg.py's loop: read with cv2, generate, write one COCO-RLE JSON per image."""
    import cv2
    import torch
    from segment_anything import SamAutomaticMaskGenerator

    generator = SamAutomaticMaskGenerator(sam, output_mode="coco_rle", **settings)
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    with torch.no_grad():
        for path in images:
            image = cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB)
            masks = generator.generate(image)
            name = os.path.splitext(os.path.basename(path))[0]
            with open(os.path.join(out, name + ".json"), "w") as f:
                json.dump(masks, f)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_b")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--points-per-side", type=int, default=16)
    p.add_argument("--crop-n-layers", type=int, default=0)
    p.add_argument("--relaxed", action="store_true", help="keep masks (thresholds 0)")
    p.add_argument("--skip-official", action="store_true")
    p.add_argument("--out", default="benchmarks/results/annotate_cpu.json")
    args = p.parse_args()

    import jax
    import segment_anything as sa
    import torch

    from sam_jax.annotate.auto import PAPER_SETTINGS, annotate_dataset
    from sam_jax.checkpoints.mapping import state_dict_to_params
    from sam_jax.config import get_config
    from sam_jax.modeling import build_sam

    settings = {
        **PAPER_SETTINGS,
        "points_per_side": args.points_per_side,
        "crop_n_layers": args.crop_n_layers,
    }
    if args.relaxed:
        settings.update(pred_iou_thresh=0.0, stability_score_thresh=0.0)
    torch.manual_seed(0)
    sam = sa.sam_model_registry[args.model](checkpoint=None).eval()
    sd = {k: v.numpy() for k, v in sam.state_dict().items() if "pixel_" not in k}
    config = get_config(args.model)
    model, params = build_sam(config), state_dict_to_params(sd, config)
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "in")
        os.makedirs(src)
        images = _make_images(src, args.images + 1, args.height, args.width)
        warm = os.path.join(tmp, "warm")  # compile on one image first (both sides warm up)
        os.makedirs(warm)
        os.rename(images[0], os.path.join(warm, os.path.basename(images[0])))
        images = images[1:]
        annotate_dataset(model, params, warm, os.path.join(tmp, "warm_out"), settings)
        t0 = time.perf_counter()
        result = annotate_dataset(model, params, src, os.path.join(tmp, "ours"), settings)
        ours = time.perf_counter() - t0
        official = None
        if not args.skip_official:
            _official_loop(sam, [os.path.join(warm, os.listdir(warm)[0])], tmp + "/w2", settings)
            official = _official_loop(sam, images, os.path.join(tmp, "official"), settings)
    row = {
        "model": args.model,
        "images": args.images,
        "image_hw": [args.height, args.width],
        "settings": settings,
        "sam_jax_images_per_s": args.images / ours,
        "sam_jax_masks": result.masks,
        "official_images_per_s": None if official is None else args.images / official,
        "speedup": None if official is None else official / ours,
    }
    machine = describe(
        load,
        platform=jax.default_backend(),
        devices=[d.device_kind for d in jax.local_devices()],
        torch_threads=torch.get_num_threads(),
    )
    print("| model | images | sam_jax img/s | official img/s | official / sam_jax time |")
    print("|---|---|---|---|---|")
    off, ratio = row["official_images_per_s"], row["speedup"]
    off_text = "-" if off is None else f"{off:.3f}"
    ratio_text = "-" if ratio is None else f"{ratio:.2f}"
    ours_text = f"{row['sam_jax_images_per_s']:.3f}"
    print(f"| {args.model} | {args.images} | {ours_text} | {off_text} | {ratio_text} |")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": machine, "args": vars(args), "result": row}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
