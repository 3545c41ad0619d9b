"""SA-1B reader: a folder of the released tars (sa_000000.tar ...) or of extracted jpg+json pairs.

Reads the files in place (local or tf.io.gfile paths), no preparation step. Tars are indexed by
scanning their headers once (member offsets), then images are read by random access. Each JSON is
{"image": {image_id, width, height, file_name}, "annotations": [{segmentation: COCO RLE, ...}]}.
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
import tarfile
from concurrent.futures import ThreadPoolExecutor

from sam_jax.data import io
from sam_jax.data.records import (
    Record,
    count,
    decode_image,
    logger,
    rle_masks_from_segmentations,
    skip_image,
)


@dataclasses.dataclass(frozen=True)
class _Blob:
    """A byte range of a file (size None: the whole file)."""

    path: str
    offset: int = 0
    size: int | None = None

    def read(self) -> bytes:
        return io.read_bytes(self.path, self.offset, self.size)


@dataclasses.dataclass(frozen=True)
class SA1BItem:
    """One image of SA-1B: its name stem and where its jpg and json bytes are."""

    stem: str
    jpg: _Blob
    json: _Blob


def _pair(entries: dict[tuple[str, str], dict[str, _Blob]], where: str) -> list[SA1BItem]:
    items, unpaired = [], 0
    for (_, stem), blobs in sorted(entries.items()):
        if "jpg" in blobs and "json" in blobs:
            items.append(SA1BItem(stem, blobs["jpg"], blobs["json"]))
        else:
            unpaired += 1
    if unpaired:
        logger.warning("%s: %d jpg/json files without their pair were ignored", where, unpaired)
    return items


def index_tar(tar_path: str) -> list[SA1BItem]:
    """Scans a tar's headers and returns its jpg+json pairs (sorted by directory and stem)."""
    entries: dict[tuple[str, str], dict[str, _Blob]] = {}
    with io.open_binary(tar_path) as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            stem, ext = posixpath.splitext(posixpath.basename(member.name))
            ext = ext.lower().lstrip(".")
            if ext in ("jpg", "jpeg", "json"):
                key = (posixpath.dirname(member.name), stem)
                blob = _Blob(tar_path, member.offset_data, member.size)
                entries.setdefault(key, {})["json" if ext == "json" else "jpg"] = blob
    return _pair(entries, tar_path)


def list_sa1b(path: str) -> tuple[list[str], list[SA1BItem]]:
    """(sorted tar paths, jpg+json pairs found as plain files) under a folder, or a single tar."""
    if not io.isdir(path):
        if path.lower().endswith(".tar"):
            return [path], []
        raise ValueError(f"sa1b: {path!r} is neither a folder nor a .tar file")
    tars, entries = [], {}
    for dirpath, _, filenames in io.walk(path):
        for name in filenames:
            stem, ext = posixpath.splitext(name)
            ext = ext.lower().lstrip(".")
            full = io.join(dirpath, name)
            if ext == "tar":
                tars.append(full)
            elif ext in ("jpg", "jpeg", "json"):
                entries.setdefault((dirpath, stem), {})["json" if ext == "json" else "jpg"] = _Blob(
                    full
                )
    pairs = _pair(entries, path)
    if not tars and not pairs:
        raise ValueError(f"sa1b: no .tar files or jpg+json pairs found under {path!r}")
    return sorted(tars), pairs


def _index_tars(tars: list[str]) -> list[SA1BItem]:
    if not tars:
        return []
    with ThreadPoolExecutor(max_workers=min(16, len(tars))) as pool:
        return [item for items in pool.map(index_tar, tars) for item in items]


def sa1b_record(
    image_bytes: bytes, json_bytes: bytes, image_id: str, stats: dict | None
) -> Record | None:
    """Builds a Record from one SA-1B jpg + json; None (counted, logged) if unusable."""
    try:
        meta = json.loads(json_bytes)
        annotations = meta["annotations"]
        image = decode_image(image_bytes)
    except Exception as e:  # noqa: BLE001 - any decode failure skips the image
        skip_image(stats, image_id, e)
        return None
    segmentations = [a.get("segmentation") if isinstance(a, dict) else None for a in annotations]
    masks = rle_masks_from_segmentations(segmentations, image.shape[:2], image_id, stats)
    count(stats, "decoded_images")
    return Record(image_id, image, masks)


class SA1BSource:
    """Random-access SA-1B images of one host's share.

    With at least `process_count` tars, tars are dealt to hosts round robin (each host scans only
    its tars); otherwise images are dealt round robin. Plain jpg+json pairs are always dealt by
    image.
    """

    def __init__(self, path: str, process_index: int = 0, process_count: int = 1):
        tars, pairs = list_sa1b(path)
        if tars and len(tars) >= process_count:
            self.items = (
                _index_tars(tars[process_index::process_count])
                + pairs[process_index::process_count]
            )
        else:
            self.items = (_index_tars(tars) + pairs)[process_index::process_count]
        self.path = path

    def __len__(self) -> int:
        return len(self.items)

    def load(self, i: int, stats: dict | None = None) -> Record | None:
        item = self.items[i]
        try:
            image_bytes, json_bytes = item.jpg.read(), item.json.read()
        except Exception as e:  # noqa: BLE001 - OSError, tf.errors.OpError, ...
            skip_image(stats, item.stem, e)
            return None
        return sa1b_record(image_bytes, json_bytes, item.stem, stats)
