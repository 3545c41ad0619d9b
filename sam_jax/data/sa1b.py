"""SA-1B reader: a folder of the released tars (sa_000000.tar ...) or of extracted jpg+json pairs.

Reads the files in place (local or gs:// paths, through `sam_jax.paths`), no preparation step.
Each tar's member headers are scanned once and cached (`sa1b_index`); images are then read by
random access. Each JSON is {"image": {image_id, width, height, file_name}, "annotations":
[{segmentation: COCO RLE, ...}]}.
"""

from __future__ import annotations

import json
import os
import posixpath
import time

from sam_jax import paths
from sam_jax.data.records import (
    Record,
    count,
    decode_image,
    logger,
    rle_masks_from_segmentations,
    skip_image,
)
from sam_jax.data.sa1b_index import (
    INDEX_DIRNAME,
    DatasetIndex,
    default_index_dir,
    load_tar_indices,
)

_MAX_READ_GAP = 1 << 16  # jpg and json members this close are read in one request


def list_sa1b(path: str) -> tuple[list[str], list[tuple[str, str, str]]]:
    """(sorted tar paths, sorted (stem, jpg path, json path) plain-file pairs) under a folder, or
    a single tar. The index folder (.sam_jax_index) is not searched."""
    if not paths.isdir(path):
        if path.lower().endswith(".tar"):
            return [path], []
        raise ValueError(f"sa1b: {path!r} is neither a folder nor a .tar file")
    tars, entries = [], {}
    for dirpath, dirnames, filenames in paths.walk(path):
        dirnames[:] = [d for d in dirnames if d != INDEX_DIRNAME]
        for name in filenames:
            stem, ext = posixpath.splitext(name)
            ext = ext.lower().lstrip(".")
            full = paths.join(dirpath, name)
            if ext == "tar":
                tars.append(full)
            elif ext in ("jpg", "jpeg", "json"):
                entries.setdefault((dirpath, stem), {})["json" if ext == "json" else "jpg"] = full
    pairs = [(k[1], v["jpg"], v["json"]) for k, v in sorted(entries.items()) if len(v) == 2]
    if len(pairs) < len(entries):
        logger.warning(
            "%s: %d jpg/json files without their pair were ignored", path, len(entries) - len(pairs)
        )
    if not tars and not pairs:
        raise ValueError(f"sa1b: no .tar files or jpg+json pairs found under {path!r}")
    return sorted(tars), pairs


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


def _read_members(path: str, jpg: tuple[int, int], js: tuple[int, int]) -> tuple[bytes, bytes]:
    """The bytes of two (offset, size) ranges of a file, in one read when they are close."""
    lo, hi = min(jpg[0], js[0]), max(jpg[0] + jpg[1], js[0] + js[1])
    if hi - lo <= jpg[1] + js[1] + _MAX_READ_GAP:
        data = paths.read_bytes(path, lo, hi - lo)
        return data[jpg[0] - lo : jpg[0] - lo + jpg[1]], data[js[0] - lo : js[0] - lo + js[1]]
    return paths.read_bytes(path, *jpg), paths.read_bytes(path, *js)


class SA1BSource:
    """Random access to every image of an SA-1B folder (or one tar), on every host.

    Global order, the same for any process_count: the tars sorted by path (within a tar, pairs
    sorted by directory and stem), then the plain jpg+json pairs sorted by folder and stem.
    Tar indices are cached in `index_dir` (default: `sa1b_index.default_index_dir(path)`);
    process_index/process_count only share the building of missing ones: process p builds
    tars[p::process_count], then `barrier()` (e.g. a multihost sync; every process must open the
    source), then each reads all of them. For the building to be shared, index_dir must be one
    folder all processes see (the default is host-local for gs:// data: pass a shared one such as
    gs://bucket/sa1b_index). The index is flat numpy arrays (`self.index`, ~47 bytes per image).
    """

    def __init__(
        self,
        path: str,
        index_dir: str | None = None,
        process_index: int = 0,
        process_count: int = 1,
        barrier=None,
    ):
        if index_dir is not None and not isinstance(index_dir, (str, os.PathLike)):
            raise TypeError(
                f"SA1BSource: index_dir must be a path or None, got {index_dir!r} "
                "(pass process_index / process_count by keyword)"
            )
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
        start = time.perf_counter()
        self.path = path
        tars, self.pairs = list_sa1b(path)
        self.index_dir = None
        counts = {"reused": 0, "built": 0}
        indices = []
        if tars:
            root = path if paths.isdir(path) else paths.parent(path)
            self.index_dir = os.fspath(index_dir) if index_dir is not None else None
            self.index_dir = self.index_dir or default_index_dir(path)
            indices, counts = load_tar_indices(
                tars, root, self.index_dir, process_index, process_count, barrier
            )
        elif barrier is not None:
            barrier()  # every process calls it once, whatever the layout
        self.index = DatasetIndex.concat(tars, indices)
        logger.info(
            "sa1b %s: %d images (%d in %d tars, %d plain pairs); tar indices: %d reused, %d built "
            "(index dir %s, %.2f s)",
            path,
            len(self),
            len(self.index),
            len(tars),
            len(self.pairs),
            counts["reused"],
            counts["built"],
            self.index_dir,
            time.perf_counter() - start,
        )
        self.index_counts = counts

    def __len__(self) -> int:
        return len(self.index) + len(self.pairs)

    def image_id(self, i: int) -> str:
        """The file stem of image i ("sa_223750")."""
        i = self._check(i)
        if i < len(self.index):
            return self.index.stems[i].decode("utf-8")
        return self.pairs[i - len(self.index)][0]

    def _check(self, i: int) -> int:
        if not 0 <= i < len(self):
            raise IndexError(f"SA1BSource index {i} out of range [0, {len(self)})")
        return int(i)

    def metadata(self, i: int) -> dict:
        """Image i's SA-1B JSON ({"image": {...}, "annotations": [{segmentation, area, bbox,
        predicted_iou, stability_score, point_coords, crop_box, ...}]}), read without its jpg.
        Raises ValueError (one line) when it cannot be read or is not such a JSON."""
        i = self._check(i)
        try:
            if i < len(self.index):
                x = self.index
                data = paths.read_bytes(
                    x.tars[x.tar_id[i]], int(x.json_offset[i]), int(x.json_size[i])
                )
            else:
                data = paths.read_bytes(self.pairs[i - len(self.index)][2])
            meta = json.loads(data)
            if not isinstance(meta.get("annotations"), list):
                raise ValueError("it has no 'annotations' list")
        except Exception as e:  # noqa: BLE001 - OSError, JSON errors, a JSON that is not a dict
            raise ValueError(f"sa1b: the JSON of {self.image_id(i)} is unreadable ({e})") from None
        return meta

    def load(self, i: int, stats: dict | None = None) -> Record | None:
        """Record of image i; None (counted in stats, logged) if it cannot be read or decoded."""
        i = self._check(i)
        image_id = self.image_id(i)
        try:
            if i < len(self.index):
                x = self.index
                image_bytes, json_bytes = _read_members(
                    x.tars[x.tar_id[i]],
                    (int(x.jpg_offset[i]), int(x.jpg_size[i])),
                    (int(x.json_offset[i]), int(x.json_size[i])),
                )
            else:
                _, jpg, js = self.pairs[i - len(self.index)]
                image_bytes, json_bytes = paths.read_bytes(jpg), paths.read_bytes(js)
        except Exception as e:  # noqa: BLE001 - OSError, fsspec/gcsfs errors, ...
            skip_image(stats, image_id, e)
            return None
        return sa1b_record(image_bytes, json_bytes, image_id, stats)
