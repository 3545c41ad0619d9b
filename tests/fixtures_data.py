"""Small on-disk datasets for tests, written from synthetic examples (import from any test).

    fx = write_sa1b_dataset(tmp_path / "sa1b", layout="tar")       # or "pairs" / "both"
    fx = write_coco_dataset(tmp_path / "coco")
    for ex in iterate_examples(fx.spec, stats=stats): ...          # fx.masks[ex["image_id"]]

Each writer returns a `DataFixture` with the spec string to read it, the expected masks per image id
(what a correct reader returns, in order) and the skip counts a reader should report. With
broken=True the fixture also holds deliberately bad entries: an undecodable image, a bad RLE, a
zero-area mask (and for COCO a bad polygon, a missing image file, a crowd annotation and an image
without annotations).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import tarfile
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from sam_jax.data.synthetic import SyntheticConfig, synthetic_example


@dataclasses.dataclass
class DataFixture:
    """A dataset written by a fixture writer.

    spec: dataset spec string for iterate_examples / make_train_iterator.
    path: the sa1b folder, or the coco annotation file.
    images: image id -> uint8 (H, W, 3) image as generated (before JPEG compression).
    masks: image id -> bool (M, H, W) masks a correct reader yields, in order (readable images
        only; images left without masks are absent).
    broken_images: ids of images that cannot be decoded (or are missing).
    expected_stats: counts a reader should report when reading everything once with default
        options (keys "skipped_images", "skipped_masks", "empty_masks", "crowd_masks",
        "images_without_masks"; zero counts included).
    """

    spec: str
    path: str
    images: dict
    masks: dict
    broken_images: list
    expected_stats: dict


def synthetic_examples(
    n: int, image_size=(40, 56), seed: int = 7, split: str = "test"
) -> list[dict]:
    """n synthetic examples (dicts with image, masks, image_id) of a small non-square size."""
    config = SyntheticConfig(image_size=image_size, seed=seed, num_test=n, num_val=n, num_train=n)
    return [synthetic_example(i, split, config) for i in range(n)]


def encode_image(image: np.ndarray, fmt: str = "JPEG") -> bytes:
    """uint8 (H, W, 3) -> encoded bytes (JPEG quality 95 4:4:4, or PNG for exact pixels)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(
        buf, format=fmt, **({"quality": 95, "subsampling": 0} if fmt == "JPEG" else {})
    )
    return buf.getvalue()


def encode_rle(mask: np.ndarray) -> dict:
    """bool (H, W) -> COCO compressed RLE {"size": [h, w], "counts": str} via pycocotools."""
    import pycocotools.mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode()}


def uncompressed_rle(mask: np.ndarray) -> dict:
    """bool (H, W) -> COCO uncompressed RLE {"size": [h, w], "counts": [runs...]} (column-major)."""
    flat = mask.astype(np.uint8).flatten(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat[0] == 1:
        runs = [0] + runs
    return {"size": list(mask.shape), "counts": runs}


def bad_rle(hw) -> dict:
    """A well-formed RLE string whose runs do not add up to h * w (an undecodable mask)."""
    h, w = hw
    wrong = np.zeros((h, w + 1), bool)
    wrong[: h // 2, : w // 2] = True
    return {"size": [h, w], "counts": encode_rle(wrong)["counts"]}


def sa1b_json(image_id: int, file_name: str, hw, segmentations: list[dict]) -> dict:
    """An SA-1B per-image JSON with the given RLE segmentations (other fields plausible)."""
    import pycocotools.mask as mask_utils

    anns = []
    for k, seg in enumerate(segmentations):
        try:
            rle = {"size": seg["size"], "counts": seg["counts"].encode()}
            bbox, area = mask_utils.toBbox(rle).tolist(), int(mask_utils.area(rle))
        except Exception:  # noqa: BLE001 - deliberately broken RLEs
            bbox, area = [0.0, 0.0, 1.0, 1.0], 1
        anns.append(
            {
                "id": image_id * 1000 + k,
                "segmentation": seg,
                "bbox": bbox,
                "area": area,
                "predicted_iou": 0.9,
                "point_coords": [[bbox[0] + 0.5, bbox[1] + 0.5]],
                "stability_score": 0.95,
                "crop_box": [0, 0, hw[1], hw[0]],
            }
        )
    return {
        "image": {"image_id": image_id, "width": hw[1], "height": hw[0], "file_name": file_name},
        "annotations": anns,
    }


def write_sa1b_dataset(
    root,
    examples: list[dict] | None = None,
    layout: str = "tar",
    images_per_tar: int = 3,
    broken: bool = True,
    image_format: str = "JPEG",
) -> DataFixture:
    """Writes SA-1B files under `root` from examples (default: 6 synthetic ones).

    layout: "tar" (sa_000000.tar, sa_000001.tar, ... of images_per_tar images each), "pairs"
    (extracted sa_N.jpg + sa_N.json files) or "both" (the first half in tars, the rest as pairs).
    With broken=True: image 1's jpg is garbage, image 2 gets an extra bad-RLE annotation and
    image 3 an extra all-zero mask. image_format "PNG" stores exact pixels (still named .jpg).
    Image ids are the file stems "sa_1", "sa_2", ...
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    examples = synthetic_examples(6) if examples is None else examples
    files, fx = [], DataFixture(f"sa1b:{root}", str(root), {}, {}, [], _zero_stats())
    for n, ex in enumerate(examples, start=1):
        stem = f"sa_{n}"
        hw = ex["image"].shape[:2]
        segs = [encode_rle(m) for m in ex["masks"]]
        image_bytes = encode_image(ex["image"], image_format)
        fx.images[stem] = ex["image"]
        if broken and n == 1:
            image_bytes = b"\xff\xd8\xff\xe0 this is not a jpeg"
            fx.broken_images.append(stem)
            fx.expected_stats["skipped_images"] += 1
        else:
            fx.masks[stem] = ex["masks"]
        if broken and n == 2:
            segs.append(bad_rle(hw))
            fx.expected_stats["skipped_masks"] += 1
        if broken and n == 3:
            segs.append(encode_rle(np.zeros(hw, bool)))
            fx.expected_stats["empty_masks"] += 1
        meta = json.dumps(sa1b_json(n, stem + ".jpg", hw, segs)).encode()
        files.append((stem, image_bytes, meta))
    n_tar = {"tar": len(files), "pairs": 0, "both": len(files) // 2}[layout]
    for t in range(0, n_tar, images_per_tar):
        with tarfile.open(root / f"sa_{t // images_per_tar:06d}.tar", "w") as tar:
            for stem, image_bytes, meta in files[t : min(t + images_per_tar, n_tar)]:
                for name, data in ((stem + ".jpg", image_bytes), (stem + ".json", meta)):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    for stem, image_bytes, meta in files[n_tar:]:
        (root / f"{stem}.jpg").write_bytes(image_bytes)
        (root / f"{stem}.json").write_bytes(meta)
    return fx


def mask_polygons(mask: np.ndarray) -> list[list[float]]:
    """Outer contours of a bool mask as COCO polygons (flat [x0, y0, x1, y1, ...] lists)."""
    import cv2

    contours, _ = cv2.findContours(
        mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
    )
    return [c.reshape(-1).astype(float).tolist() for c in contours if len(c) >= 3]


def write_coco_dataset(
    root, examples: list[dict] | None = None, broken: bool = True, image_format: str = "JPEG"
) -> DataFixture:
    """Writes a COCO instances dataset (root/annotations.json, root/images/) from examples.

    Masks alternate between polygons, compressed RLE and uncompressed (list) RLE. Expected masks
    come from pycocotools' COCO.annToMask. With broken=True: image 2's file is garbage, image 3's
    file is missing, image 4 gets a bad RLE, a bad polygon, an all-zero mask and a crowd
    annotation, and an extra image without annotations is listed. Image ids are "1", "2", ...
    """
    from pycocotools.coco import COCO

    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    examples = synthetic_examples(6) if examples is None else examples
    images, anns = [], []
    fx = DataFixture("", "", {}, {}, [], _zero_stats())

    broken_anns = set()

    def add(image_id, seg, iscrowd=0) -> int:
        anns.append(
            {
                "id": len(anns) + 1,
                "image_id": image_id,
                "category_id": 1,
                "segmentation": seg,
                "iscrowd": iscrowd,
                "area": 1.0,
                "bbox": [0, 0, 1, 1],
            }
        )
        return len(anns)

    for n, ex in enumerate(examples, start=1):
        h, w = ex["image"].shape[:2]
        file_name = f"{n:012d}.jpg"
        images.append({"id": n, "file_name": file_name, "height": h, "width": w})
        fx.images[str(n)] = ex["image"]
        data = encode_image(ex["image"], image_format)
        if broken and n == 2:
            data = b"garbage, not an image"
        if not (broken and n == 3):
            (root / "images" / file_name).write_bytes(data)
        if broken and n in (2, 3):
            fx.broken_images.append(str(n))
            fx.expected_stats["skipped_images"] += 1
        for k, mask in enumerate(ex["masks"]):
            polys = mask_polygons(mask)
            kind = k % 3
            if kind == 0 and polys:
                add(n, polys)
            elif kind == 1:
                add(n, encode_rle(mask))
            else:
                add(n, uncompressed_rle(mask))
        if broken and n == 4:
            broken_anns.add(add(n, bad_rle((h, w))))
            broken_anns.add(add(n, [[1.0, 2.0, 3.0, 4.0]]))  # a polygon with two points
            add(n, encode_rle(np.zeros((h, w), bool)))
            add(n, uncompressed_rle(ex["masks"][0]), iscrowd=1)
            fx.expected_stats["skipped_masks"] += 2
            fx.expected_stats["empty_masks"] += 1
            fx.expected_stats["crowd_masks"] += 1
    if broken:
        n = len(examples) + 1
        (root / "images" / f"{n:012d}.jpg").write_bytes(encode_image(examples[0]["image"]))
        images.append(
            {
                "id": n,
                "file_name": f"{n:012d}.jpg",
                "height": examples[0]["image"].shape[0],
                "width": examples[0]["image"].shape[1],
            }
        )
        fx.images[str(n)] = examples[0]["image"]
        fx.expected_stats["images_without_masks"] += 1
    ann_path = root / "annotations.json"
    ann_path.write_text(
        json.dumps(
            {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}
        )
    )
    fx.spec, fx.path = f"coco:{ann_path}:{root / 'images'}", str(ann_path)
    coco = _quiet_coco(COCO, str(ann_path))
    for img in images:
        key = str(img["id"])
        if key in fx.broken_images:
            continue
        good = [
            a for a in coco.imgToAnns[img["id"]] if not a["iscrowd"] and a["id"] not in broken_anns
        ]
        with warnings.catch_warnings():  # pycocotools vs numpy 2 DeprecationWarning
            warnings.simplefilter("ignore", DeprecationWarning)
            masks = [coco.annToMask(a).astype(bool) for a in good]
        masks = [m for m in masks if m.any()]
        if masks:
            fx.masks[key] = np.stack(masks)
    return fx


def _quiet_coco(coco_cls, path: str):
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        return coco_cls(path)


def _zero_stats() -> dict:
    keys = ("skipped_images", "skipped_masks", "empty_masks", "crowd_masks", "images_without_masks")
    return dict.fromkeys(keys, 0)
