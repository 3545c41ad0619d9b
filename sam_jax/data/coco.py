"""COCO instance annotations reader (polygons, compressed RLE and uncompressed list RLE).

Masks are built as pycocotools' `COCO.annToRLE` does. Crowd annotations (iscrowd=1) are skipped
and counted unless include_crowd is set. Images are read from IMAGES_DIR/file_name (LVIS entries,
which have only coco_url, use its basename).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import posixpath

from sam_jax import paths
from sam_jax.data.records import (
    Record,
    count,
    decode_image,
    rle_masks_from_segmentations,
    skip_image,
)


@dataclasses.dataclass(frozen=True)
class CocoImage:
    """One image entry with its annotations' (segmentation, iscrowd) pairs."""

    image_id: int
    file_name: str
    height: int
    width: int
    annotations: tuple


def load_coco_index(ann_path: str) -> tuple[CocoImage, ...]:
    """Loads a COCO instances JSON into image entries sorted by image id (cached per file).

    Raises ValueError (one line) if the file is not JSON or not in COCO instances format.
    """
    stamp = paths.file_signature(ann_path)
    return _load_coco_index(ann_path, stamp)


@functools.lru_cache(maxsize=2)
def _load_coco_index(ann_path: str, stamp) -> tuple[CocoImage, ...]:
    try:
        data = json.loads(paths.read_bytes(ann_path))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"coco: {ann_path!r} is not valid JSON ({e})") from None
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("images"), list)
        or not isinstance(data.get("annotations"), list)
    ):
        raise ValueError(
            f"coco: {ann_path!r} is not a COCO instances file (needs 'images' and "
            "'annotations' lists)"
        )
    anns: dict[int, list] = {}
    for a in data["annotations"]:
        if not isinstance(a, dict) or "image_id" not in a or "segmentation" not in a:
            raise ValueError(
                f"coco: {ann_path!r} is not a COCO instances file (an annotation "
                "lacks 'image_id' or 'segmentation')"
            )
        anns.setdefault(a["image_id"], []).append((a["segmentation"], int(a.get("iscrowd", 0))))
    images = []
    for im in data["images"]:
        try:
            images.append(
                CocoImage(
                    im["id"],
                    im.get("file_name") or posixpath.basename(im["coco_url"]),  # LVIS: coco_url
                    int(im["height"]),
                    int(im["width"]),
                    tuple(anns.get(im["id"], ())),
                )
            )
        except (KeyError, TypeError, ValueError):
            raise ValueError(
                f"coco: {ann_path!r} is not a COCO instances file (an image entry "
                "lacks id, file_name, height or width)"
            ) from None
    return tuple(sorted(images, key=lambda im: im.image_id))


class CocoSource:
    """Random-access COCO images (sorted by id)."""

    def __init__(self, ann_path: str, images_dir: str, include_crowd: bool = False):
        self.images = load_coco_index(ann_path)
        self.images_dir = images_dir
        self.include_crowd = include_crowd

    def __len__(self) -> int:
        return len(self.images)

    def load(self, i: int, stats: dict | None = None) -> Record | None:
        entry = self.images[i]
        image_id = str(entry.image_id)
        try:
            image = decode_image(paths.read_bytes(paths.join(self.images_dir, entry.file_name)))
            if image.shape[:2] != (entry.height, entry.width):
                raise ValueError(
                    f"decoded size {image.shape[:2]} != annotated size "
                    f"{(entry.height, entry.width)}"
                )
        except Exception as e:  # noqa: BLE001 - any read/decode failure skips the image
            skip_image(stats, image_id, e)
            return None
        segmentations = []
        for seg, iscrowd in entry.annotations:
            if iscrowd and not self.include_crowd:
                count(stats, "crowd_masks")
                continue
            segmentations.append(seg)
        masks = rle_masks_from_segmentations(segmentations, image.shape[:2], image_id, stats)
        count(stats, "decoded_images")
        return Record(image_id, image, masks)
