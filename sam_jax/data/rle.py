"""COCO run-length encoding (RLE) checks and decoding.

COCO RLE stores a mask of size (h, w) in column-major (Fortran) order as alternating run lengths,
starting with a run of zeros. The compressed form (`counts` a string) packs the runs in 5-bit groups
(pycocotools `rleFrString`). pycocotools does not validate its input (a bad string decodes to
uninitialised memory), so every RLE is checked here first: valid characters, non-negative runs, runs
summing to h * w. Masks are kept as run lengths and decoded with numpy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def counts_from_string(counts: str | bytes) -> np.ndarray:
    """Decodes a compressed COCO RLE counts string into run lengths, int64 (n,).

    Vectorised port of pycocotools' `rleFrString`. Raises ValueError on characters outside the
    alphabet, a truncated last group or a group too long to be a run length.
    """
    if isinstance(counts, str):
        try:
            counts = counts.encode("ascii")
        except UnicodeEncodeError as e:
            raise ValueError("RLE counts string is not ASCII") from e
    c = np.frombuffer(counts, np.uint8).astype(np.int64) - 48
    if c.size == 0:
        return np.zeros((0,), np.int64)
    if c.min() < 0 or c.max() > 63:
        raise ValueError("RLE counts string has characters outside the COCO alphabet")
    more = (c & 0x20) != 0
    if more[-1]:
        raise ValueError("RLE counts string is truncated")
    ends = np.flatnonzero(~more)
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts + 1
    if lengths.max() > 7:
        raise ValueError("RLE counts string has an oversized run")
    k = np.arange(c.size) - np.repeat(starts, lengths)
    x = np.add.reduceat((c & 0x1F) << (5 * k), starts)  # disjoint bit ranges: sum == bitwise or
    x = np.where((c[ends] & 0x10) != 0, x - (1 << (5 * lengths)), x)  # sign extension
    runs = x.copy()
    runs[1::2] = np.cumsum(x[1::2])  # runs[m] = x[m] + runs[m - 2] for m > 2
    runs[2::2] = np.cumsum(x[2::2])
    return runs


def check_runs(runs: Sequence[int] | np.ndarray, h: int, w: int) -> int:
    """Checks that run lengths describe an (h, w) mask; returns the mask area (ones)."""
    runs = np.asarray(runs, dtype=np.int64)
    if runs.ndim != 1:
        raise ValueError("RLE counts must be a flat list")
    if runs.size and runs.min() < 0:
        raise ValueError("RLE has negative run lengths")
    total = int(runs.sum())
    if total != h * w:
        raise ValueError(f"RLE counts sum to {total}, expected h * w = {h * w}")
    return int(runs[1::2].sum())


def rle_size(rle: dict) -> tuple[int, int]:
    """(h, w) of an RLE dict, checked to be two positive integers."""
    size = rle.get("size") if isinstance(rle, dict) else None
    if size is None or len(size) != 2:
        raise ValueError("RLE has no valid 'size' [h, w]")
    h, w = int(size[0]), int(size[1])
    if h <= 0 or w <= 0:
        raise ValueError(f"RLE has a non-positive size {(h, w)}")
    return h, w


def check_rle(rle: dict) -> tuple[np.ndarray, int]:
    """Validates a COCO RLE dict (compressed string or uncompressed list counts).

    Returns (run lengths int64 (n,), area). Raises ValueError if invalid.
    """
    h, w = rle_size(rle)
    counts = rle.get("counts")
    if isinstance(counts, (str, bytes, np.bytes_)):
        runs = counts_from_string(bytes(counts) if isinstance(counts, np.bytes_) else counts)
    elif isinstance(counts, (list, tuple, np.ndarray)):
        runs = np.asarray(counts, dtype=np.int64)
    else:
        raise ValueError("RLE 'counts' must be a string or a list of ints")
    return runs, check_runs(runs, h, w)


def decode_runs(runs: np.ndarray, h: int, w: int) -> np.ndarray:
    """Checked run lengths -> bool (h, w) mask (a Fortran-ordered array, as COCO stores it)."""
    values = (np.arange(len(runs)) % 2).astype(bool)
    return np.repeat(values, runs).reshape(w, h).T


def rle_to_mask(rle: dict) -> np.ndarray:
    """Bool (h, w) C-ordered mask of a COCO RLE dict, compressed or uncompressed (the official
    AMG `rle_to_mask`, with `check_rle`'s checks)."""
    runs, _ = check_rle(rle)
    return np.ascontiguousarray(decode_runs(runs, *rle_size(rle)))


def polygons_to_runs(polygons: list, h: int, w: int) -> np.ndarray:
    """COCO polygons [[x0, y0, x1, y1, ...], ...] -> run lengths of their union (as annToRLE).

    Raises ValueError for polygons that are not lists of at least 3 finite (x, y) pairs.
    """
    import pycocotools.mask as mask_utils  # lazy

    if not isinstance(polygons, list) or not polygons:
        raise ValueError("polygon segmentation must be a non-empty list of polygons")
    clean = []
    for poly in polygons:
        p = np.asarray(poly, dtype=np.float64)
        if p.ndim != 1 or p.size < 6 or p.size % 2 or not np.isfinite(p).all():
            raise ValueError("a polygon must be a flat list of at least 3 finite (x, y) pairs")
        clean.append(p.tolist())
    merged = mask_utils.merge(mask_utils.frPyObjects(clean, h, w))
    return counts_from_string(merged["counts"])
