"""sam_jax.prompts: checks, packing and buckets of prompts (the parity of what they decode is in
test_predictor.py and test_functional.py)."""

import numpy as np
import pytest

from sam_jax import prompts as P


def test_padding_buckets():
    assert [P.bucket_size(n) for n in (0, 1, 2, 3, 5, 8, 9)] == [1, 1, 2, 4, 8, 8, 16]
    assert P.bucket_size(3, minimum=8) == 8 and P.bucket_size(9, minimum=8) == 16
    x = np.arange(6).reshape(3, 2)
    assert P.pad_rows(x, 3) is x
    np.testing.assert_array_equal(P.pad_rows(x, 5), [[0, 1], [2, 3], [4, 5], [0, 1], [0, 1]])
    with pytest.raises(ValueError, match="cannot pad"):
        P.pad_rows(x, 2)


@pytest.mark.parametrize("dtype", [bool, np.uint8, np.int32])
def test_binary_mask_input_is_refused_with_what_to_pass(dtype):
    """A binary mask given as mask_input would be read as 0/1 logits (wrong masks, no error)."""
    mask = np.zeros((1, 16, 16), dtype)
    mask[0, 4:8, 4:8] = 1
    with pytest.raises(ValueError, match=r"low-res mask logits \(float\), got a .* mask: pass"):
        P.ImagePrompts.single(16, mask_input=mask)
    with pytest.raises(ValueError, match="low-res mask logits"):
        P.ImagePrompts.batch(16, mask_input=mask[None])
    logits = np.where(mask, 10.0, -10.0).astype(np.float32)
    got = P.ImagePrompts.single(16, mask_input=logits)
    np.testing.assert_array_equal(got.mask_input, logits)


def test_tokens_and_buckets_follow_the_official_order():
    prompts = P.ImagePrompts.batch(
        16,
        point_coords=np.array([[[10.0, 20.0], [30.0, 40.0]]] * 3),
        point_labels=np.array([[1, 0]] * 3),
    )
    assert prompts.num == 3 and prompts.num_tokens == 3  # 2 points + the padding point
    pts, labs, size = P.bucketed_tokens(prompts, (100, 200), 64, min_bucket=1)
    assert size == 4 and pts.shape == (4, 4, 2)
    np.testing.assert_array_equal(labs[0], [1, 0, P.NOT_A_POINT_LABEL, P.PAD_LABEL])
    np.testing.assert_array_equal(labs[3], labs[0])  # padded rows copy the first prompt
    np.testing.assert_allclose(pts[0, 0], [10 * 64 / 200, 20 * 32 / 100])
    boxes = P.ImagePrompts.batch(16, boxes=np.array([[1.0, 2.0, 3.0, 4.0]]))
    assert boxes.num_tokens == 2
    none = P.ImagePrompts.batch(16, allow_none=True)
    pts, labs, size = P.bucketed_tokens(none, (100, 200), 64, min_bucket=8)
    assert size == 8 and (labs == P.PAD_LABEL).all()


def test_select_shifts_coordinates_by_the_offset():
    prompts = P.ImagePrompts.batch(
        16,
        point_coords=np.array([[[10.0, 20.0]], [[30.0, 40.0]]]),
        point_labels=np.ones((2, 1)),
        boxes=np.array([[0.0, 1.0, 50.0, 60.0], [5.0, 6.0, 7.0, 8.0]]),
    )
    sub = prompts.select(np.array([1]), offset=np.array([5.0, 6.0]))
    assert sub.num == 1
    np.testing.assert_array_equal(sub.point_coords, [[[25.0, 34.0]]])
    np.testing.assert_array_equal(sub.boxes, [[0.0, 0.0, 2.0, 2.0]])
