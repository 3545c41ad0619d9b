"""The record every source produces: a decoded image and its (lazily decoded) instance masks.

Sources drop zero-area and undecodable masks when they build a record and count them in a stats
dict. Masks are decoded on demand (`decode(indices)`), so the training pipeline decodes only the
masks it samples.
"""

from __future__ import annotations

import dataclasses
import logging
import threading

import numpy as np

from sam_jax.data import rle as rle_lib
from sam_jax.images import decode_image  # noqa: F401 - re-exported for the readers

logger = logging.getLogger("sam_jax.data")
_STATS_LOCK = threading.Lock()


def count(stats: dict | None, key: str, n: int = 1) -> None:
    """Adds n to stats[key] (thread-safe; no-op when stats is None)."""
    if stats is None or n == 0:
        return
    with _STATS_LOCK:
        stats[key] = stats.get(key, 0) + n


class DenseMasks:
    """Masks held as a bool (K, H, W) array."""

    def __init__(self, masks: np.ndarray):
        self.masks = np.asarray(masks, dtype=bool)
        self.areas = self.masks.reshape(len(self.masks), -1).sum(-1).astype(np.int64)

    def __len__(self) -> int:
        return len(self.masks)

    def decode(self, indices=None) -> np.ndarray:
        """bool (k, H, W) masks for `indices` (all by default)."""
        return self.masks if indices is None else self.masks[np.asarray(indices, dtype=np.int64)]

    def decode_one(self, i: int) -> np.ndarray:
        """bool (H, W) mask i."""
        return self.masks[int(i)]


class RleMasks:
    """Masks held as checked COCO run lengths of one (H, W) size."""

    def __init__(self, runs: list[np.ndarray], areas, hw: tuple[int, int]):
        self.runs = list(runs)
        self.areas = np.asarray(areas, dtype=np.int64).reshape(len(self.runs))
        self.hw = hw

    def __len__(self) -> int:
        return len(self.runs)

    def decode(self, indices=None) -> np.ndarray:
        """bool (k, H, W) masks for `indices` (all by default)."""
        idx = range(len(self.runs)) if indices is None else indices
        out = np.zeros((len(idx), *self.hw), dtype=bool)
        for j, i in enumerate(idx):
            out[j] = rle_lib.decode_runs(self.runs[int(i)], *self.hw)
        return out

    def decode_one(self, i: int) -> np.ndarray:
        """bool (H, W) mask i, as a transposed view of a C-contiguous (W, H) array (no copy)."""
        return rle_lib.decode_runs(self.runs[int(i)], *self.hw)


@dataclasses.dataclass
class Record:
    """One image with its instance masks. image: uint8 (H, W, 3); masks: DenseMasks | RleMasks."""

    image_id: str
    image: np.ndarray
    masks: DenseMasks | RleMasks

    def to_example(self) -> dict:
        """The public example format: {"image" uint8 (H,W,3), "masks" bool (M,H,W), "image_id"}."""
        return {"image": self.image, "masks": self.masks.decode(), "image_id": self.image_id}


def skip_image(stats: dict | None, image_id: str, err: Exception) -> None:
    """Counts and logs an image that cannot be used."""
    count(stats, "skipped_images")
    logger.warning("skipping image %s: %s: %s", image_id, type(err).__name__, err)


def rle_masks_from_segmentations(
    segmentations: list, hw: tuple[int, int], image_id: str, stats: dict | None
) -> RleMasks:
    """Checks COCO-style segmentations (RLE dicts or polygon lists) of an (H, W) image.

    Undecodable ones ("skipped_masks") and zero-area ones ("empty_masks") are dropped and counted.
    """
    h, w = hw
    runs, areas = [], []
    for k, seg in enumerate(segmentations):
        try:
            if isinstance(seg, dict):
                if rle_lib.rle_size(seg) != (h, w):
                    raise ValueError(f"RLE size {seg.get('size')} != image size {[h, w]}")
                r, area = rle_lib.check_rle(seg)
            else:
                r = rle_lib.polygons_to_runs(seg, h, w)
                area = rle_lib.check_runs(r, h, w)
        except (ValueError, TypeError, KeyError) as e:
            count(stats, "skipped_masks")
            logger.warning("skipping mask %d of image %s: %s", k, image_id, e)
            continue
        if area == 0:
            count(stats, "empty_masks")
            continue
        runs.append(r)
        areas.append(area)
    return RleMasks(runs, areas, (h, w))
