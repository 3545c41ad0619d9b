"""A small real dataset that ships with scikit-image: the nuclei of its immunohistochemistry slide
(`skimage.data.immunohistochemistry`, 512 x 512 RGB), labelled by the classic pipeline of
scikit-image's own gallery, and cut into tiles for fine-tuning and held-out evaluation.

Labelling (`label_nuclei`): colour deconvolution into haematoxylin / eosin / DAB (`rgb2hed`), the
haematoxylin channel smoothed and thresholded (a local threshold above the global Otsu one),
opened, holes filled, then split into nuclei by a watershed of the distance transform from its
peaks; regions under 40 or over 900 pixels are dropped. This gives about 390 nuclei, the
stroma's elongated ones and the glands' rounder ones (median 134 pixels).

Tiles: a 4 x 4 grid of 128 x 128 tiles. `test` (held out) is one tile per row and per column of
the grid, (0, 3), (1, 1), (2, 2), (3, 0), so that it holds both tissue kinds; `train` the other
12. A nucleus cut by a tile's edge keeps its part inside (at least MIN_AREA pixels).

Dataset spec: `nuclei[:SPLIT]` (see sam_jax.data.spec). scikit-image and scipy are imported
lazily (the `train` extra).
"""

from __future__ import annotations

import functools

import numpy as np

SPLITS = ("train", "test")
GRID, TILE = 4, 128
TEST_TILES = ((0, 3), (1, 1), (2, 2), (3, 0))
MIN_AREA = 20  # pixels of a nucleus inside a tile
_NUCLEUS_AREA = (40, 900)  # pixels of a whole nucleus on the slide


def label_nuclei(rgb: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) RGB of an IHC slide -> int32 (H, W) nucleus labels (0: background)."""
    from scipy import ndimage as ndi
    from skimage import color, exposure, feature, filters, measure, morphology, segmentation

    hed = color.rgb2hed(rgb)
    h = filters.gaussian(exposure.rescale_intensity(hed[..., 0], out_range=(0.0, 1.0)), sigma=1.0)
    mask = (h > filters.threshold_local(h, block_size=51, offset=-0.02)) & (
        h > filters.threshold_otsu(h)
    )
    mask = ndi.binary_fill_holes(ndi.binary_opening(mask, structure=morphology.disk(1)))
    mask = morphology.remove_small_objects(mask, max_size=30)
    dist = filters.gaussian(ndi.distance_transform_edt(mask), sigma=1.0)
    peaks = feature.peak_local_max(
        dist, min_distance=5, threshold_abs=2.0, labels=measure.label(mask), exclude_border=False
    )
    markers = np.zeros(mask.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    labels = segmentation.watershed(-dist, markers, mask=mask)
    areas = np.bincount(labels.ravel())
    drop = np.flatnonzero((areas < _NUCLEUS_AREA[0]) | (areas > _NUCLEUS_AREA[1]))
    labels[np.isin(labels, drop)] = 0
    return segmentation.relabel_sequential(labels)[0].astype(np.int32)


@functools.lru_cache(maxsize=1)
def _slide() -> tuple[np.ndarray, np.ndarray]:
    from skimage import data

    rgb = np.asarray(data.immunohistochemistry(), np.uint8)
    return rgb, label_nuclei(rgb)


def tiles(split: str) -> list[tuple[int, int]]:
    """The (row, column) grid tiles of a split, row-major."""
    if split not in SPLITS:
        raise ValueError(f"nuclei split must be one of {SPLITS}, got {split!r}")
    held_out = set(TEST_TILES)
    cells = [(r, c) for r in range(GRID) for c in range(GRID)]
    return [rc for rc in cells if (rc in held_out) == (split == "test")]


def tile_example(row: int, col: int) -> dict:
    """{"image_id", "image": uint8 (TILE, TILE, 3), "masks": bool (M, TILE, TILE)} of a tile."""
    rgb, labels = _slide()
    window = np.s_[row * TILE : (row + 1) * TILE, col * TILE : (col + 1) * TILE]
    tile_labels = labels[window]
    ids, counts = np.unique(tile_labels[tile_labels > 0], return_counts=True)
    ids = ids[counts >= MIN_AREA]
    masks = tile_labels[None] == ids[:, None, None]
    return {"image_id": row * GRID + col, "image": rgb[window].copy(), "masks": masks}


class NucleiDataset:
    """Random access to the tiles of a split: `dataset[i]` is `tile_example` of its i-th tile."""

    def __init__(self, split: str):
        self.cells = tiles(split)

    def __len__(self) -> int:
        return len(self.cells)

    def __getitem__(self, i: int) -> dict:
        return tile_example(*self.cells[i])
