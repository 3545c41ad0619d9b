"""sam_jax.amg.masks against the official segment_anything.utils.amg and torchvision batched_nms."""

import builtins

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from segment_anything.utils import amg as ref
from torchvision.ops import batched_nms as tv_batched_nms

from sam_jax.amg import masks as au

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools")


def _random_masks(rng, b, h, w):
    masks = rng.random((b, h, w)) < 0.5
    masks[0] = False  # empty
    masks[1] = True  # full
    masks[2] = False
    masks[2, 3:7, 2:9] = True  # a rectangle
    return masks


def _blobby_masks(rng, b, h, w):
    """Masks with holes and islands of many sizes."""
    from scipy import ndimage

    noise = ndimage.gaussian_filter(rng.standard_normal((b, h, w)), sigma=(0, 1.5, 1.5))
    return noise > 0.05


@pytest.mark.parametrize("n", [1, 2, 7, 32])
def test_point_grids_match_official(n):
    np.testing.assert_array_equal(au.build_point_grid(n), ref.build_point_grid(n))
    for layers, scale in [(0, 1), (2, 1), (1, 2), (3, 2)]:
        if n < scale**layers:
            continue
        ours = au.build_all_layer_point_grids(n, layers, scale)
        theirs = ref.build_all_layer_point_grids(n, layers, scale)
        assert len(ours) == len(theirs) == layers + 1
        for a, b in zip(ours, theirs, strict=True):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="at least 1 point"):
        au.build_point_grid(0)


@pytest.mark.parametrize(
    "size,layers,ratio",
    [
        ((480, 640), 0, 512 / 1500),
        ((480, 640), 2, 512 / 1500),
        ((1500, 2250), 3, 0.2),
        ((7, 5), 1, 0.5),
    ],
)
def test_crop_boxes_match_official(size, layers, ratio):
    assert au.generate_crop_boxes(size, layers, ratio) == ref.generate_crop_boxes(
        size, layers, ratio
    )


def test_rle_matches_official_and_round_trips():
    rng = np.random.default_rng(0)
    masks = _random_masks(rng, 6, 11, 13)
    ours = au.mask_to_rle(masks)
    theirs = ref.mask_to_rle_pytorch(torch.as_tensor(masks))
    assert ours == theirs
    for m, rle in zip(masks, ours, strict=True):
        assert all(type(c) is int for c in rle["counts"])
        np.testing.assert_array_equal(au.rle_to_mask(rle), m)
        np.testing.assert_array_equal(ref.rle_to_mask(rle), m)
        assert au.area_from_rle(rle) == ref.area_from_rle(rle) == int(m.sum())
        coco = au.coco_encode_rle(rle)
        assert coco == ref.coco_encode_rle(rle)
        assert isinstance(coco["counts"], str)
        np.testing.assert_array_equal(mask_utils.decode(coco).astype(bool), m)
    with pytest.raises(ValueError, match="RLE counts"):
        au.rle_to_mask({"size": [2, 2], "counts": [1, 1]})


def test_stability_score_matches_official():
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal((4, 3, 20, 24)) * 3).astype(np.float32)
    logits[0, 0] = -5.0  # empty union -> NaN in both
    ours = np.asarray(au.calculate_stability_score(logits, 0.0, 1.0))
    theirs = ref.calculate_stability_score(torch.as_tensor(logits), 0.0, 1.0).numpy()
    assert ours.dtype == theirs.dtype == np.float32
    np.testing.assert_array_equal(ours, theirs)
    assert np.isnan(ours[0, 0])


def test_mask_to_box_matches_official():
    rng = np.random.default_rng(2)
    masks = _random_masks(rng, 5, 9, 12)
    masks[3] = False
    masks[3, 4, 7] = True  # a single pixel
    masks = masks.reshape(5, 1, 9, 12)
    ours = np.asarray(au.batched_mask_to_box(jnp.asarray(masks)))
    theirs = ref.batched_mask_to_box(torch.as_tensor(masks)).numpy()
    np.testing.assert_array_equal(ours, theirs)
    host = au.batched_mask_to_box(masks)
    assert isinstance(host, np.ndarray)
    np.testing.assert_array_equal(host, theirs)
    assert ours.shape == (5, 1, 4)
    np.testing.assert_array_equal(ours[2, 0], [2, 3, 8, 6])
    assert au.batched_mask_to_box(np.zeros((0, 4, 4), bool)).shape == (0, 4)


def test_box_edge_and_uncrop_match_official():
    rng = np.random.default_rng(3)
    x0 = rng.integers(0, 300, (200, 1))
    y0 = rng.integers(0, 200, (200, 1))
    boxes = np.concatenate([x0, y0, x0 + rng.integers(0, 200, (200, 1)), y0 + 50], 1)
    boxes[:3] = [[0, 0, 20, 20], [0, 0, 21, 21], [100, 100, 379, 279]]
    for crop in ([0, 0, 640, 480], [120, 80, 400, 300], [300, 200, 640, 480]):
        ours = np.asarray(au.is_box_near_crop_edge(boxes, crop, [0, 0, 640, 480]))
        theirs = ref.is_box_near_crop_edge(torch.as_tensor(boxes), crop, [0, 0, 640, 480]).numpy()
        np.testing.assert_array_equal(ours, theirs)
        assert 0 < ours.sum() < len(ours) or crop[0] == 0
        np.testing.assert_array_equal(
            au.uncrop_boxes_xyxy(boxes, crop), ref.uncrop_boxes_xyxy(torch.as_tensor(boxes), crop)
        )
        pts = rng.random((7, 2)) * 100
        np.testing.assert_array_equal(
            au.uncrop_points(pts, crop), ref.uncrop_points(torch.as_tensor(pts), crop).numpy()
        )
    masks = _random_masks(rng, 3, 5, 6)
    crop = [2, 1, 8, 6]
    np.testing.assert_array_equal(
        au.uncrop_masks(masks, crop, 9, 10), ref.uncrop_masks(torch.as_tensor(masks), crop, 9, 10)
    )
    np.testing.assert_array_equal(au.box_xyxy_to_xywh(np.array([3, 4, 10, 12])), [3, 4, 7, 8])
    assert ref.box_xyxy_to_xywh(torch.tensor([3, 4, 10, 12])).tolist() == [3, 4, 7, 8]


@pytest.mark.parametrize("use_cv2", [True, False])
def test_remove_small_regions_matches_official(use_cv2, monkeypatch):
    masks = _blobby_masks(np.random.default_rng(4), 6, 40, 50)
    masks[5] = False
    masks[5, 2:4, 2:4] = masks[5, 30:33, 40:43] = True  # only small islands: the largest stays
    cases = [(m, mode, t) for m in masks for mode in ("holes", "islands") for t in (5, 30, 200)]
    expected = [ref.remove_small_regions(m, t, mode) for m, mode, t in cases]
    if not use_cv2:  # the scipy.ndimage fallback
        real_import = builtins.__import__

        def no_cv2(name, *args, **kwargs):
            if name == "cv2":
                raise ImportError("no cv2")
            return real_import(name, *args, **kwargs)

        monkeypatch.setattr(builtins, "__import__", no_cv2)
    for (m, mode, t), (theirs, t_changed) in zip(cases, expected, strict=True):
        ours, changed = au.remove_small_regions(m, t, mode)
        assert changed == t_changed
        np.testing.assert_array_equal(ours, theirs)
    assert sum(c for _, c in expected) > 5
    big, changed = au.remove_small_regions(masks[5], 100, "islands")
    assert changed and big.sum() == 9
    with pytest.raises(ValueError, match="mode"):
        au.remove_small_regions(masks[0], 3, "both")


def _tv_nms(boxes, scores, idxs, thr):
    return tv_batched_nms(
        torch.as_tensor(boxes, dtype=torch.float32),
        torch.as_tensor(scores, dtype=torch.float32),
        torch.as_tensor(idxs),
        iou_threshold=thr,
    ).numpy()


def _random_boxes(rng, n, tie_levels=None):
    xy = rng.integers(0, 120, (n, 2))
    wh = rng.integers(0, 50, (n, 2))  # includes zero-area boxes
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    if tie_levels:
        scores = rng.integers(0, tie_levels, n).astype(np.float32)
    else:
        scores = rng.random(n).astype(np.float32)
    return boxes, scores


@pytest.mark.parametrize("thr", [0.7, 0.5, 0.3])
@pytest.mark.parametrize("ties", [None, 3])
def test_box_nms_matches_torchvision(thr, ties):
    rng = np.random.default_rng(int(thr * 10) + (ties or 0))
    for n in (1, 5, 64, 700):
        boxes, scores = _random_boxes(rng, n, ties)
        zeros = np.zeros(n, np.int64)
        theirs = _tv_nms(boxes, scores, zeros, thr)
        ours = au.batched_nms(boxes, scores, zeros, thr)
        assert ours.dtype == np.int64
        np.testing.assert_array_equal(ours, theirs)  # same boxes, same order
        if n == 700:
            assert 0 < len(ours) < n
        cats = rng.integers(0, 3, n)
        np.testing.assert_array_equal(
            au.batched_nms(boxes, scores, cats, thr), _tv_nms(boxes, scores, cats, thr)
        )


def test_box_nms_large_and_edge_cases():
    rng = np.random.default_rng(7)
    # > 1000 boxes: torchvision's per-class path orders tied scores arbitrarily; same kept set
    # and same order wherever scores differ.
    boxes, scores = _random_boxes(rng, 1500, 4)
    zeros = np.zeros(1500, np.int64)
    ours, theirs = au.batched_nms(boxes, scores, zeros, 0.6), _tv_nms(boxes, scores, zeros, 0.6)
    np.testing.assert_array_equal(np.sort(ours), np.sort(theirs))
    np.testing.assert_array_equal(scores[ours], scores[theirs])
    np.testing.assert_array_equal(ours, theirs[np.lexsort((theirs, -scores[theirs]))])
    # IoU exactly 3/10: float32(0.3) > 0.3, so torchvision suppresses at threshold 0.3.
    b = np.array([[0, 0, 10, 1], [0, 0, 3, 1], [20, 0, 30, 1]], np.float32)
    s = np.array([0.9, 0.8, 0.7], np.float32)
    for thr in (0.3, 0.7, 0.29, 0.71):
        np.testing.assert_array_equal(
            au.batched_nms(b, s, np.zeros(3, int), thr), _tv_nms(b, s, np.zeros(3, int), thr)
        )
    assert au.batched_nms(b, s, np.zeros(3, int), 0.3).tolist() == [0, 2]
    assert au.batched_nms(b, s, np.zeros(3, int), 0.31).tolist() == [0, 1, 2]
    assert au.f32_greater_threshold(0.3) < np.float32(0.3)
    assert au.f32_greater_threshold(0.7) == np.float32(0.7)
    assert au.batched_nms(np.zeros((0, 4)), np.zeros(0), np.zeros(0), 0.5).shape == (0,)
    # Fixed-shape device form: invalid boxes are ignored.
    valid = np.array([False, True, True])
    keep, num = au.box_nms(b, s, au.f32_greater_threshold(0.3), valid=valid)
    assert int(num) == 2 and np.asarray(keep).tolist() == [1, 2, -1]
