"""COCO RLE checking and decoding against pycocotools."""

import numpy as np
import pycocotools.mask as mask_utils
import pytest

from sam_jax.data import rle as rle_lib
from tests.fixtures_data import encode_rle, uncompressed_rle

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _random_masks(rng, n=20):
    for _ in range(n):
        h, w = rng.integers(1, 90, 2)
        mask = rng.random((h, w)) < rng.uniform(0, 1)
        if rng.random() < 0.3:  # large runs exercise multi-character groups
            mask[:] = False
            mask[: h // 2] = True
        yield mask


def test_counts_from_string_matches_pycocotools():
    rng = np.random.default_rng(0)
    for mask in _random_masks(rng):
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        runs = rle_lib.counts_from_string(rle["counts"])
        assert runs.sum() == mask.size
        values = np.arange(len(runs)) % 2
        decoded = np.repeat(values, runs).reshape(mask.shape[::-1]).T.astype(bool)
        assert np.array_equal(decoded, mask)
        runs, area = rle_lib.check_rle({"size": list(mask.shape), "counts": rle["counts"].decode()})
        assert area == mask.sum() == mask_utils.area(rle)
        assert np.array_equal(rle_lib.decode_runs(runs, *mask.shape), mask_utils.decode(rle) > 0)


def test_uncompressed_rle_roundtrip():
    rng = np.random.default_rng(1)
    for mask in _random_masks(rng, 10):
        runs, area = rle_lib.check_rle(uncompressed_rle(mask))
        assert area == mask.sum()
        assert np.array_equal(rle_lib.decode_runs(runs, *mask.shape), mask)


@pytest.mark.parametrize("counts", ["zzzz", "1", "", "0", "abc\x01", "P"])
def test_bad_strings_raise(counts):
    with pytest.raises(ValueError):
        rle_lib.check_rle({"size": [5, 6], "counts": counts})


def test_bad_rle_dicts_raise():
    good = encode_rle(np.eye(6, dtype=bool)[:5])
    with pytest.raises(ValueError, match="sum"):
        rle_lib.check_rle({"size": [5, 7], "counts": good["counts"]})
    with pytest.raises(ValueError, match="size"):
        rle_lib.check_rle({"counts": good["counts"]})
    with pytest.raises(ValueError, match="negative"):
        rle_lib.check_rle({"size": [2, 2], "counts": [5, -1]})
    with pytest.raises(ValueError, match="polygon"):
        rle_lib.polygons_to_runs([[0, 0, 1, 1]], 4, 4)


def test_polygons_match_pycocotools():
    poly = [[2.0, 1.0, 20.5, 3.0, 15.0, 18.0, 4.0, 12.5], [25.0, 20.0, 30.0, 20.0, 28.0, 29.0]]
    expected = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(poly, 32, 40)))
    runs = rle_lib.polygons_to_runs(poly, 32, 40)
    assert np.array_equal(rle_lib.decode_runs(runs, 32, 40), expected > 0)


def test_rle_to_mask_decodes_compressed_and_uncompressed():
    rng = np.random.default_rng(3)
    mask = rng.random((7, 9)) < 0.5
    compressed = encode_rle(mask)
    np.testing.assert_array_equal(rle_lib.rle_to_mask(compressed), mask)
    decoded = rle_lib.rle_to_mask(uncompressed_rle(mask))
    np.testing.assert_array_equal(decoded, mask)
    assert decoded.flags.c_contiguous
    with pytest.raises(ValueError, match="RLE counts sum"):
        rle_lib.rle_to_mask({"size": [2, 2], "counts": [1, 1]})
