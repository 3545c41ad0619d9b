"""The fully automatic stage of the data engine: masks for every image of a dataset, as SA-1B.

`annotate_dataset` runs `SamAutomaticMaskGenerator` (the paper's settings by default: a 32x32
grid plus two layers of zoomed crops, predicted IoU >= 0.88, stability >= 0.95, NMS 0.7 within
and across crops, holes and islands under 100 px removed, masks covering >= 95% of the image
dropped) over the images of a folder or bucket and writes one SA-1B JSON per image,
`<stem>.json`, with the image beside it as `<stem>.jpg` (copied when it is a JPEG, else encoded),
so the output folder is an `sa1b:` training source.

Scale: every local device runs generators (`workers_per_device` threads per device, so one image
is decoded, post-processed and RLE-encoded on the host while another is on the device), and each
process of a multi-host job takes the disjoint share images[process_index::process_count].
Resuming: an image whose JSON exists is skipped; files appear whole (the image first, then the
JSON, each written to a temporary name and renamed), so a crash or SIGTERM leaves no partial
file. Unreadable images are counted and listed, never silently dropped.
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from sam_jax import paths
from sam_jax.images import list_images
from sam_jax.outputs import output_stems

# The paper's fully automatic settings (SAM paper appendix B; the official option names).
PAPER_SETTINGS: dict[str, Any] = {
    "points_per_side": 32,
    "points_per_batch": 64,
    "pred_iou_thresh": 0.88,
    "stability_score_thresh": 0.95,
    "stability_score_offset": 1.0,
    "box_nms_thresh": 0.7,
    "crop_n_layers": 2,
    "crop_nms_thresh": 0.7,
    "crop_overlap_ratio": 512 / 1500,
    "crop_n_points_downscale_factor": 2,
    "min_mask_region_area": 100,
}
MAX_AREA_FRACTION = 0.95  # masks covering this much of the image or more are dropped
_SA1B_STEM = re.compile(r"sa_(\d+)")


def image_id(stem: str, index: int) -> int:
    """SA-1B's id for sa_<N> files, else the image's position in the sorted folder + 1."""
    m = _SA1B_STEM.fullmatch(stem)
    return int(m.group(1)) if m else index + 1


def sa1b_record(
    records: list[dict[str, Any]], image_id_: int, file_name: str, hw: tuple[int, int]
) -> dict[str, Any]:
    """The SA-1B JSON of one image from the generator's coco_rle records."""
    h, w = hw
    annotations = [
        {
            "id": image_id_ * 1_000_000 + k,
            "segmentation": r["segmentation"],
            "area": r["area"],
            "bbox": r["bbox"],
            "predicted_iou": r["predicted_iou"],
            "stability_score": r["stability_score"],
            "point_coords": r["point_coords"],
            "crop_box": r["crop_box"],
        }
        for k, r in enumerate(records)
    ]
    image = {"image_id": image_id_, "width": w, "height": h, "file_name": file_name}
    return {"image": image, "annotations": annotations}


def drop_large_masks(records: list[dict], hw: tuple[int, int], fraction: float) -> list[dict]:
    """The records whose mask covers less than `fraction` of the image."""
    limit = fraction * hw[0] * hw[1]
    return [r for r in records if r["area"] < limit]


@dataclasses.dataclass
class AnnotateResult:
    """What one process did: images annotated now, skipped (already done), failed [(path, why)],
    masks written and the wall time."""

    annotated: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    masks: int = 0
    seconds: float = 0.0
    images: list[str] = dataclasses.field(default_factory=list)  # the share this process owns


def jpeg_bytes(raw: bytes, path: str, image: np.ndarray) -> bytes:
    """The image as JPEG bytes: the file itself when it is a JPEG, else encoded (quality 95)."""
    if posixpath.splitext(path)[1].lower() in (".jpg", ".jpeg"):
        return raw
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def annotate_dataset(
    model,
    params,
    input_dir: str,
    output_dir: str,
    settings: dict[str, Any] | None = None,
    max_area_fraction: float = MAX_AREA_FRACTION,
    copy_images: bool = True,
    process_index: int = 0,
    process_count: int = 1,
    devices: list | None = None,
    workers_per_device: int = 2,
    on_image: Callable[[str, int], None] | None = None,
) -> AnnotateResult:
    """Annotates this process's share of `input_dir` into `output_dir` (see the module doc).

    settings: SamAutomaticMaskGenerator options over PAPER_SETTINGS; devices: the local devices
    to use (default: all); on_image(path, masks): called after each image is written (progress).
    """
    import jax

    from sam_jax.amg.generator import SamAutomaticMaskGenerator
    from sam_jax.images import decode_image

    if not 0 < max_area_fraction <= 1:
        raise ValueError(f"max_area_fraction must be in (0, 1], got {max_area_fraction}")
    options = {**PAPER_SETTINGS, **(settings or {})}
    SamAutomaticMaskGenerator(None, None, **options)  # checks every option before any work
    t0 = time.perf_counter()
    images = list_images(input_dir)
    stems = output_stems(images)
    ids = [image_id(s, i) for i, s in enumerate(stems)]
    mine = list(range(len(images)))[process_index::process_count]
    result = AnnotateResult(images=[images[i] for i in mine])
    paths.makedirs(output_dir)
    todo = []
    for i in mine:
        if paths.exists(paths.join(output_dir, stems[i] + ".json")):
            result.skipped += 1
        else:
            todo.append(i)
    if not todo:
        result.seconds = time.perf_counter() - t0
        return result

    devices = list(devices or jax.local_devices())
    generators = [
        SamAutomaticMaskGenerator(
            model, jax.device_put(params, d), output_mode="coco_rle", **options
        )
        for d in devices
    ]
    slots = threading.local()
    next_slot = iter(range(1 << 30))
    lock = threading.Lock()

    def annotate_one(i: int) -> tuple[int, int | str]:
        if not hasattr(slots, "k"):
            with lock:
                slots.k = next(next_slot) % len(devices)
        path = images[i]
        try:
            raw = paths.read_bytes(path)
            image = decode_image(raw)
        except Exception as e:  # noqa: BLE001 - any unreadable image is reported, not fatal
            return i, f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
        with jax.default_device(devices[slots.k]):
            records = generators[slots.k].generate(image)
        hw = image.shape[:2]
        records = drop_large_masks(records, hw, max_area_fraction)
        name = stems[i] + ".jpg"
        if copy_images:
            paths.write_bytes(paths.join(output_dir, name), jpeg_bytes(raw, path, image))
        record = sa1b_record(records, ids[i], name, hw)
        paths.write_text(paths.join(output_dir, stems[i] + ".json"), json.dumps(record))
        return i, len(records)

    pool = ThreadPoolExecutor(len(devices) * max(1, workers_per_device))
    try:
        for i, outcome in pool.map(annotate_one, todo):
            if isinstance(outcome, str):
                result.failed.append((images[i], outcome))
                continue
            result.annotated += 1
            result.masks += outcome
            if on_image is not None:
                on_image(images[i], outcome)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    result.seconds = time.perf_counter() - t0
    return result
