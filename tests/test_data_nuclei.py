"""The nuclei dataset of scikit-image's IHC slide: tiles, splits and labels."""

import numpy as np
import pytest
from skimage import color

from sam_jax.data import iterate_examples, nuclei, parse_dataset_spec


def test_splits_partition_the_grid_and_hold_both_tissues():
    train, test = nuclei.tiles("train"), nuclei.tiles("test")
    assert sorted(train + test) == [(r, c) for r in range(4) for c in range(4)]
    assert len(test) == 4 and {r for r, _ in test} == {c for _, c in test} == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="nuclei split"):
        nuclei.tiles("val")
    with pytest.raises(ValueError, match="nuclei split must be one of"):
        parse_dataset_spec("nuclei:val")


def test_labels_are_haematoxylin_rich_disjoint_nuclei():
    rgb, labels = nuclei._slide.__wrapped__()
    n = labels.max()
    assert 300 <= n <= 450  # about 390 nuclei on the slide
    areas = np.bincount(labels.ravel())[1:]
    assert areas.min() >= 40 and areas.max() <= 900
    h = color.rgb2hed(rgb)[..., 0]
    inside, outside = h[labels > 0].mean(), h[labels == 0].mean()
    assert inside > outside + 2 * h[labels == 0].std() / 3  # stained nuclei, not background
    per_nucleus = np.bincount(labels.ravel(), h.ravel())[1:] / areas
    assert (per_nucleus > outside).mean() > 0.95


def test_examples_are_tiles_with_their_nuclei():
    examples = list(iterate_examples("nuclei:test"))
    assert len(examples) == 4
    for ex in examples:
        assert ex["image"].shape == (128, 128, 3) and ex["image"].dtype == np.uint8
        masks = ex["masks"]
        assert masks.dtype == bool and len(masks) >= 10
        assert (masks.sum(axis=(1, 2)) >= nuclei.MIN_AREA).all()
        assert masks.sum(axis=0).max() == 1  # disjoint instances
    train = list(iterate_examples("nuclei:train"))
    assert len(train) == 12 and sum(len(ex["masks"]) for ex in train) > 250
