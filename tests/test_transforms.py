"""sam_jax.transforms against the official segment_anything pre/post-processing."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as TF
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide

from sam_jax import transforms as T


def _photos():
    coffee = skimage.data.coffee()
    return {
        "astronaut": skimage.data.astronaut(),  # 512 x 512
        "chelsea": skimage.data.chelsea(),  # 300 x 451 landscape
        "coffee_portrait": np.ascontiguousarray(coffee.transpose(1, 0, 2)),  # 600 x 400
        "rocket": skimage.data.rocket(),  # 427 x 640
    }


def _official_sam(image_size):
    """A stand-in `self` for the official Sam.preprocess / postprocess_masks methods."""
    return types.SimpleNamespace(
        image_encoder=types.SimpleNamespace(img_size=image_size),
        pixel_mean=torch.tensor([123.675, 116.28, 103.53]).view(-1, 1, 1),
        pixel_std=torch.tensor([58.395, 57.12, 57.375]).view(-1, 1, 1),
    )


@pytest.mark.parametrize(
    "size", [(1, 1), (3, 1000), (480, 640), (1500, 1499), (1024, 1024), (77, 13)]
)
@pytest.mark.parametrize("long_side", [1024, 256, 100])
def test_get_preprocess_shape_matches_official(size, long_side):
    assert T.get_preprocess_shape(*size, long_side) == ResizeLongestSide.get_preprocess_shape(
        *size, long_side
    )


@pytest.mark.parametrize("name", ["astronaut", "chelsea", "coffee_portrait", "rocket"])
@pytest.mark.parametrize("long_side", [1024, 256, 97])
def test_resize_longest_side_bit_exact(name, long_side):
    image = _photos()[name]
    expected = ResizeLongestSide(long_side).apply_image(image)
    got = T.resize_longest_side(image, long_side)
    assert got.dtype == np.uint8
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


def test_resize_longest_side_random_and_noncontiguous():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(37, 91, 3), dtype=np.uint8)
    bgr = image[..., ::-1]  # a strided view, as SamPredictor makes for BGR input
    for img in (image, bgr):
        np.testing.assert_array_equal(
            T.resize_longest_side(img, 128), ResizeLongestSide(128).apply_image(img)
        )


def test_apply_coords_and_boxes_match_official():
    rng = np.random.default_rng(1)
    for original_size in [(300, 451), (600, 400), (512, 512), (1500, 2000)]:
        rlt = ResizeLongestSide(1024)
        coords = rng.uniform(0, 500, size=(3, 5, 2))
        np.testing.assert_array_equal(
            T.apply_coords(coords, original_size, 1024), rlt.apply_coords(coords, original_size)
        )
        boxes = rng.uniform(0, 500, size=(4, 4))
        np.testing.assert_array_equal(
            T.apply_boxes(boxes, original_size, 1024), rlt.apply_boxes(boxes, original_size)
        )
        # A single box keeps its shape.
        assert T.apply_boxes(boxes[0], original_size, 1024).shape == (4,)
    ints = np.array([[10, 20]])
    out = T.apply_coords(ints, (100, 200), 50)
    assert out.dtype == np.float64 and ints[0, 0] == 10  # input untouched
    np.testing.assert_allclose(out, [[2.5, 5.0]])


def test_normalize_and_pad_matches_official_preprocess():
    image = T.resize_longest_side(_photos()["chelsea"], 256)  # (170, 256, 3)
    got = T.normalize_and_pad(image, 256)
    assert got.shape == (256, 256, 3) and got.dtype == np.float32
    x = torch.as_tensor(image).permute(2, 0, 1).contiguous()[None]
    expected = Sam.preprocess(_official_sam(256), x)[0].permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(got, expected)
    assert np.all(got[image.shape[0] :] == 0)


def test_normalize_and_pad_rejects_too_large():
    with pytest.raises(ValueError, match="does not fit"):
        T.normalize_and_pad(np.zeros((300, 10, 3), np.uint8), 256)


@pytest.mark.parametrize(
    "in_size,out_size",
    [
        ((64, 64), (256, 256)),
        ((256, 256), (1024, 1024)),
        ((683, 1024), (400, 600)),
        ((171, 256), (300, 451)),
        ((7, 5), (13, 2)),
        ((10, 10), (10, 10)),
        ((12, 9), (12, 20)),
        ((9, 12), (20, 12)),
    ],
)
def test_resize_bilinear_matches_torch(in_size, out_size):
    rng = np.random.default_rng(2)
    x = (rng.normal(size=(2, 3, *in_size)) * 10).astype(np.float32)
    expected = TF.interpolate(
        torch.from_numpy(x), out_size, mode="bilinear", align_corners=False
    ).numpy()
    got = np.asarray(jax.jit(T.resize_bilinear, static_argnums=1)(jnp.asarray(x), out_size))
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6 * np.abs(expected).max())
    # jax.image.resize antialiases when downsampling by default: that is not what SAM does.
    if out_size[0] < in_size[0]:
        aa = np.asarray(jax.image.resize(jnp.asarray(x), expected.shape, "bilinear"))
        assert np.abs(aa - expected).max() > 1e-3


def test_resize_bilinear_to_the_same_size_is_the_identity_taps():
    """A same-size axis is sliced, not interpolated: bitwise what its taps (i, i + 1, 1, 0) give,
    also under a crop."""
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 12, 20)), jnp.float32)
    for size, crop in (((12, 20), None), ((12, 20), (7, 11)), ((12, 33), (12, 30))):
        taps = T._weighted_taps(x, -1, T._bilinear_taps(20, size[1], (crop or size)[1]))
        taps = T._weighted_taps(taps, -2, T._bilinear_taps(12, size[0], (crop or size)[0]))
        np.testing.assert_array_equal(T.resize_bilinear(x, size, crop=crop), taps)


@pytest.mark.parametrize(
    "image_size,original_size",
    [
        (1024, (400, 600)),
        (1024, (2000, 1500)),
        (256, (300, 451)),
        (256, (512, 512)),
        (256, (451, 300)),
        (256, (100, 37)),
    ],
)
def test_postprocess_masks_matches_official(image_size, original_size):
    low = image_size // 4
    input_size = T.get_preprocess_shape(*original_size, image_size)
    rng = np.random.default_rng(3)
    x = (rng.normal(size=(2, 3, low, low)) * 10).astype(np.float32)
    expected = Sam.postprocess_masks(
        _official_sam(image_size), torch.from_numpy(x), input_size, original_size
    ).numpy()
    fn = jax.jit(T.postprocess_masks, static_argnums=(1, 2, 3))
    got = np.asarray(fn(jnp.asarray(x), input_size, original_size, image_size))
    assert got.shape == (2, 3, *original_size) and got.dtype == np.float32
    # Same float32 arithmetic as aten: equal up to (at most) fused-multiply-add rounding.
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6 * np.abs(expected).max())
    assert np.array_equal(got > 0, expected > 0)


@pytest.mark.parametrize(
    "bad,match",
    [
        (np.zeros((4, 4), np.uint8), r"\(H, W, 3\)"),
        (np.zeros((4, 4, 4), np.uint8), r"\(H, W, 3\)"),
        (np.zeros((4, 4, 3), np.float32), "uint8"),
        (np.zeros((0, 4, 3), np.uint8), "empty"),
        (np.zeros((1, 200, 3), np.uint8), "too elongated"),
    ],
)
def test_check_image_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        T.resize_longest_side(bad, 64)


def test_padded_mask_sizes():
    assert T.round_up(65, 64) == 128 and T.round_up(64, 64) == 64
    # Output size rounded up; resized input extent rounded up but within the model input.
    assert T.padded_mask_sizes((192, 1024), (300, 1600), 1024) == ((320, 1600), (192, 1024))
    assert T.padded_mask_sizes((100, 70), (100, 70), 1024, multiple=32) == ((128, 96), (128, 96))
