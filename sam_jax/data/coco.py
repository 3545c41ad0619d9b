"""COCO instance annotations reader (polygons, compressed RLE and uncompressed list RLE).

Masks are built as pycocotools' `COCO.annToRLE` does. Crowd annotations (iscrowd=1) are skipped
and counted unless include_crowd is set. Images are read from IMAGES_DIR/file_name. LVIS entries
have only coco_url (".../val2017/000000397133.jpg"): they are read from IMAGES_DIR/val2017/<name>
(the COCO 2017 folders side by side, as LVIS v1 mixes train2017 and val2017 images), or from
IMAGES_DIR/<name> when IMAGES_DIR holds the images directly.
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
    from_url: bool = False  # file_name is "<split folder>/<name>" taken from coco_url


def _url_file_name(url: str) -> str:
    """ "val2017/000000397133.jpg" of an LVIS coco_url (its last two path parts)."""
    parts = [p for p in str(url).split("/") if p]
    return posixpath.join(*parts[-2:]) if len(parts) >= 2 else parts[-1]


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
            from_url = not im.get("file_name")
            images.append(
                CocoImage(
                    im["id"],
                    _url_file_name(im["coco_url"]) if from_url else im["file_name"],
                    int(im["height"]),
                    int(im["width"]),
                    tuple(anns.get(im["id"], ())),
                    from_url,
                )
            )
        except (KeyError, TypeError, ValueError):
            raise ValueError(
                f"coco: {ann_path!r} is not a COCO instances file (an image entry "
                "lacks id, file_name, height or width)"
            ) from None
    return tuple(sorted(images, key=lambda im: im.image_id))


def image_path(images_dir: str, file_name: str, from_url: bool = False) -> str:
    """IMAGES_DIR/file_name; a name taken from an LVIS coco_url ("val2017/<name>") falls back to
    IMAGES_DIR/<name> when IMAGES_DIR has no such split folder."""
    path = paths.join(images_dir, file_name)
    if from_url and not paths.exists(path):
        return paths.join(images_dir, posixpath.basename(file_name))
    return path


def image_entry_path(images_dir: str, image: dict) -> str:
    """The image file of a COCO or LVIS `images` entry (a dict of the annotation file)."""
    if image.get("file_name"):
        return image_path(images_dir, image["file_name"])
    return image_path(images_dir, _url_file_name(image.get("coco_url", "")), from_url=True)


class CocoSource:
    """Random-access COCO images (sorted by id)."""

    def __init__(self, ann_path: str, images_dir: str, include_crowd: bool = False):
        self.images = load_coco_index(ann_path)
        self.images_dir = images_dir
        self.include_crowd = include_crowd

    def __len__(self) -> int:
        return len(self.images)

    def image_path(self, entry: CocoImage) -> str:
        return image_path(self.images_dir, entry.file_name, entry.from_url)

    def load(self, i: int, stats: dict | None = None) -> Record | None:
        entry = self.images[i]
        image_id = str(entry.image_id)
        try:
            image = decode_image(paths.read_bytes(self.image_path(entry)))
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
