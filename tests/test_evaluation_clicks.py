"""Click rules on hand-made masks with answers worked out by hand (x = column, y = row)."""

import numpy as np
import pytest

from sam_jax.evaluation.clicks import distance_transform, first_click, mask_to_box, next_click


def box_mask(shape, rows, cols):
    m = np.zeros(shape, dtype=bool)
    m[rows[0] : rows[1] + 1, cols[0] : cols[1] + 1] = True
    return m


def test_distance_transform_has_zero_border():
    # A mask filling the whole image: edge pixels are 1 from the (padded) boundary.
    np.testing.assert_array_equal(
        distance_transform(np.ones((3, 3), bool)), [[1, 1, 1], [1, 2, 1], [1, 1, 1]]
    )
    dt = distance_transform(np.ones((5, 5), bool))
    assert dt[2, 2] == 3 and dt[1, 1] == 2 and dt[0, 3] == 1
    m = box_mask((5, 5), (1, 3), (1, 3))
    expected = np.zeros((5, 5))
    expected[1:4, 1:4] = 1
    expected[2, 2] = 2
    np.testing.assert_array_equal(distance_transform(m), expected)
    # Euclidean, not city-block: the centre of a 5x5 block is 3 from the outside.
    assert distance_transform(box_mask((9, 9), (2, 6), (2, 6)))[4, 4] == 3
    with pytest.raises(ValueError, match="2-D"):
        distance_transform(np.ones((2, 3, 3), bool))


def test_first_click_center_is_xy():
    m = box_mask((9, 10), (2, 6), (3, 7))  # centre row 4, column 5
    assert first_click(m) == (5, 4)


def test_first_click_center_uses_border_padding():
    # A 3-wide bar touching the left and top image edges and a disjoint 5x5 block. With the zero
    # border the bar's best pixel is only 2 from the boundary, so the block's centre (3) wins.
    # (Without the border the bar's column 0 would be 3 from the nearest zero and win the tie.)
    m = box_mask((12, 12), (0, 9), (0, 2)) | box_mask((12, 12), (5, 9), (5, 9))
    assert first_click(m) == (7, 7)
    assert first_click(np.ones((5, 5), bool)) == (2, 2)


def test_first_click_ties_take_first_row_major_pixel():
    # 2x4 rectangle: every pixel is 1 from the boundary -> the top-left one.
    assert first_click(box_mask((6, 8), (1, 2), (1, 4))) == (1, 1)
    # Two equal 3x3 squares: the upper one wins even though it lies to the right.
    m = box_mask((10, 10), (5, 7), (1, 3)) | box_mask((10, 10), (1, 3), (6, 8))
    assert first_click(m) == (7, 2)
    # Same rows: the left one wins.
    m = box_mask((10, 10), (1, 3), (1, 3)) | box_mask((10, 10), (1, 3), (6, 8))
    assert first_click(m) == (2, 2)


def test_first_click_thin_shapes():
    line = box_mask((7, 10), (3, 3), (2, 8))  # horizontal, one pixel thick
    assert first_click(line) == (2, 3)
    anti_diagonal = np.zeros((8, 8), bool)
    for i in range(5):
        anti_diagonal[1 + i, 6 - i] = True  # (x, y) = (6, 1), (5, 2), ..., (2, 5)
    assert first_click(anti_diagonal) == (6, 1)
    single = np.zeros((4, 4), bool)
    single[3, 0] = True
    assert first_click(single) == (0, 3)


def test_first_click_random():
    m = box_mask((20, 20), (3, 12), (5, 9))
    draws = [first_click(m, "random", np.random.default_rng(s)) for s in range(30)]
    assert all(m[y, x] for x, y in draws)
    assert len(set(draws)) > 10  # spread over the mask, not a fixed pixel
    again = [first_click(m, "random", np.random.default_rng(s)) for s in range(30)]
    assert draws == again
    with pytest.raises(ValueError, match="rng"):
        first_click(m, "random")
    with pytest.raises(ValueError, match="first-point mode"):
        first_click(m, "corner")
    with pytest.raises(ValueError, match="non-empty"):
        first_click(np.zeros((4, 4), bool))


def test_next_click_empty_prediction_is_positive_at_center():
    gt = box_mask((10, 10), (2, 6), (3, 7))
    assert next_click(gt, np.zeros_like(gt)) == (5, 4, 1)


def test_next_click_false_positive_region_larger():
    gt = box_mask((10, 10), (0, 2), (0, 2))
    pred = gt | box_mask((10, 10), (4, 8), (4, 8))
    assert next_click(gt, pred) == (6, 6, 0)


def test_next_click_compares_fn_and_fp_and_tie_is_negative():
    shape = (15, 15)
    gt = box_mask(shape, (1, 7), (1, 7))
    correct = box_mask(shape, (1, 7), (1, 3))
    # FN = rows 1-7, columns 4-7: max distance 2, first at column 5 of row 2.
    small_fp = box_mask(shape, (10, 11), (10, 11))  # max distance 1
    assert next_click(gt, correct | small_fp) == (5, 2, 1)
    tie_fp = box_mask(shape, (10, 12), (10, 12))  # max distance 2 at its centre: a tie
    assert next_click(gt, correct | tie_fp) == (11, 11, 0)
    big_fp = box_mask(shape, (9, 13), (9, 13))  # max distance 3
    assert next_click(gt, correct | big_fp) == (11, 11, 0)


def test_next_click_perfect_prediction_returns_none():
    gt = box_mask((8, 8), (2, 5), (1, 6))
    assert next_click(gt, gt.copy()) is None
    assert next_click(gt, gt, np.zeros_like(gt)) is None


def test_next_click_excludes_clicked_pixels():
    gt = box_mask((7, 7), (1, 5), (1, 5))
    clicked = np.zeros_like(gt)
    clicked[3, 3] = True  # the centre (distance 3) was clicked; the ring at distance 2 is next
    assert next_click(gt, np.zeros_like(gt), clicked) == (2, 2, 1)
    # The only error pixel was already clicked: nothing left to click.
    single = np.zeros((5, 5), bool)
    single[2, 2] = True
    assert next_click(single, np.zeros_like(single), single) is None
    # Clicked pixels are excluded from both regions.
    gt2 = box_mask((9, 9), (0, 0), (0, 8))  # FN: top row
    pred2 = box_mask((9, 9), (8, 8), (0, 8))  # FP: bottom row
    clicked2 = box_mask((9, 9), (8, 8), (0, 3))
    assert next_click(gt2, pred2, clicked2) == (4, 8, 0)  # FP and FN tie at 1 -> negative


def test_next_click_thin_shapes():
    gt = box_mask((8, 8), (1, 6), (2, 2))  # one-pixel vertical line
    assert next_click(gt, np.zeros_like(gt)) == (2, 1, 1)
    pred = box_mask((8, 8), (1, 6), (5, 5))  # a wrong one-pixel line: tie at 1 -> negative
    assert next_click(gt, pred) == (5, 1, 0)
    with pytest.raises(ValueError, match="shapes differ"):
        next_click(gt, pred[:4])


def _ritm_next_click(gt, pred, not_clicked):
    """RITM's clicker (isegm/inference/clicker.py) with cv2's precise distance transform."""
    import cv2

    fn = np.pad(gt & ~pred, 1).astype(np.uint8)
    fp = np.pad(~gt & pred, 1).astype(np.uint8)
    fn_dt = cv2.distanceTransform(fn, cv2.DIST_L2, 0)[1:-1, 1:-1] * not_clicked
    fp_dt = cv2.distanceTransform(fp, cv2.DIST_L2, 0)[1:-1, 1:-1] * not_clicked
    fn_max, fp_max = fn_dt.max(), fp_dt.max()
    positive = fn_max > fp_max
    ys, xs = np.where(fn_dt == fn_max) if positive else np.where(fp_dt == fp_max)
    return int(xs[0]), int(ys[0]), int(positive)


def test_next_click_matches_ritm_reference_on_random_blobs():
    from scipy import ndimage

    rng = np.random.default_rng(0)
    for _ in range(40):
        gt = ndimage.binary_opening(rng.random((24, 31)) < 0.55, iterations=1)
        pred = ndimage.binary_opening(rng.random((24, 31)) < 0.55, iterations=1)
        clicked = rng.random(gt.shape) < 0.02
        ours = next_click(gt, pred, clicked)
        if ours is not None:
            assert ours == _ritm_next_click(gt, pred, (~clicked).astype(np.float32))


def test_mask_to_box_inclusive_max():
    np.testing.assert_array_equal(mask_to_box(box_mask((8, 9), (2, 4), (3, 7))), [3, 2, 7, 4])
    with pytest.raises(ValueError, match="non-empty"):
        mask_to_box(np.zeros((3, 3), bool))


def test_cropped_distance_transform_equals_full_transform():
    from scipy import ndimage

    rng = np.random.default_rng(1)
    for _ in range(20):
        m = ndimage.binary_opening(rng.random((30, 41)) < 0.5)
        m[: rng.integers(0, 30)] = False  # regions away from some edges, touching others
        full = ndimage.distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1]
        np.testing.assert_array_equal(distance_transform(m), full)
        if m.any():
            y, x = np.unravel_index(np.argmax(full), m.shape)
            assert first_click(m) == (x, y)
