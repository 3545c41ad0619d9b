"""SamPredictor against the official segment_anything.SamPredictor (random perturbed weights, f32).

Most cases use a small SAM at image_size 256 (16x16 embedding grid, 64x64 low-res masks) on real
photographs; one full-size vit_b case is marked slow.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
import torch
from segment_anything import SamPredictor as OfficialPredictor

from sam_jax import functional as F
from sam_jax.checkpoints.mapping import state_dict_to_params
from sam_jax.config import get_config, tiny_config
from sam_jax.modeling import build_sam
from sam_jax.predictor import SamPredictor
from tests.torch_reference import build_official, rel_err, state_dict_numpy

TOL = 1e-4
CONFIG = tiny_config(image_size=256, window_size=5)  # 16x16 grid padded to 20x20 windows


def _photos():
    coffee = skimage.data.coffee()
    return {
        "astronaut": skimage.data.astronaut(),  # 512 x 512 square
        "chelsea": skimage.data.chelsea(),  # 300 x 451 landscape
        "coffee_portrait": np.ascontiguousarray(coffee.transpose(1, 0, 2)),  # 600 x 400 portrait
    }


PHOTOS = _photos()


def make_pair(config, seed=0):
    official = build_official(config, seed=seed)
    params = state_dict_to_params(state_dict_numpy(official), config)
    return official, jax.tree_util.tree_map(jnp.asarray, params)


@pytest.fixture(scope="module")
def pair():
    official, params = make_pair(CONFIG)
    return official, build_sam(CONFIG), params


@pytest.fixture(scope="module")
def predictors(pair):
    """Per photo: (official predictor, our predictor), both with the image set."""
    official, model, params = pair
    out = {}
    for name, image in PHOTOS.items():
        op, ours = OfficialPredictor(official), SamPredictor(model, params)
        with torch.no_grad():
            op.set_image(image)
        ours.set_image(image)
        out[name] = (op, ours)
    return out


def _prompts(image):
    h, w = image.shape[:2]
    pt = np.array([[0.55 * w, 0.45 * h]])
    pts = np.array([[0.55 * w, 0.45 * h], [0.1 * w, 0.15 * h], [0.8 * w, 0.7 * h]])
    box = np.array([0.2 * w, 0.25 * h, 0.75 * w, 0.9 * h])
    return {
        "point": dict(point_coords=pt, point_labels=np.array([1])),
        "points_neg": dict(point_coords=pts, point_labels=np.array([1, 0, 0])),
        "box": dict(box=box),
        "box_points": dict(box=box, point_coords=pts[:2], point_labels=np.array([1, 0])),
    }


def assert_masks_match(ours, official_logits, tol=TOL):
    """Masks equal except where the official logit is within tol (relative to its max) of 0."""
    official_logits = np.asarray(official_logits)
    assert ours.shape == official_logits.shape and ours.dtype == bool
    differ = ours != (official_logits > 0)
    margin = tol * np.abs(official_logits).max()
    assert np.all(np.abs(official_logits[differ]) <= margin), differ.sum()


def assert_outputs_match(ours, official, official_logits):
    masks, iou, low = ours
    o_masks, o_iou, o_low = official
    assert masks.shape == o_masks.shape and iou.shape == o_iou.shape and low.shape == o_low.shape
    assert rel_err(low, o_low) <= TOL
    np.testing.assert_allclose(iou, o_iou, rtol=0, atol=TOL)
    assert_masks_match(masks, official_logits)


def test_image_embedding_matches_official(predictors):
    for name, (op, ours) in predictors.items():
        emb = np.asarray(ours.get_image_embedding())
        official = op.get_image_embedding().permute(0, 2, 3, 1).numpy()
        assert emb.shape == official.shape == (1, 16, 16, 32), name
        assert rel_err(emb, official) <= TOL, name
        assert ours.original_size == op.original_size
        assert ours.input_size == op.input_size


@pytest.mark.parametrize("photo", ["chelsea", "coffee_portrait", "astronaut"])
@pytest.mark.parametrize("kind", ["point", "points_neg", "box", "box_points"])
def test_predict_matches_official(predictors, photo, kind):
    op, ours = predictors[photo]
    kw = _prompts(PHOTOS[photo])[kind]
    # Multimask for single points, single mask for the unambiguous prompts (as SAM recommends);
    # both settings are covered on chelsea.
    settings = [True, False] if photo == "chelsea" else [kind == "point"]
    for multimask in settings:
        with torch.no_grad():
            expected = op.predict(multimask_output=multimask, **kw)
            logits = op.predict(multimask_output=multimask, return_logits=True, **kw)[0]
        got = ours.predict(multimask_output=multimask, **kw)
        assert got[0].shape == (3 if multimask else 1, *PHOTOS[photo].shape[:2])
        assert_outputs_match(got, expected, logits)


def test_predict_return_logits_and_mask_input(predictors):
    op, ours = predictors["chelsea"]
    kw = _prompts(PHOTOS["chelsea"])["points_neg"]
    with torch.no_grad():
        first = op.predict(multimask_output=True, return_logits=True, **kw)
    got = ours.predict(multimask_output=True, return_logits=True, **kw)
    assert got[0].dtype == np.float32
    assert rel_err(got[0], first[0]) <= TOL
    # Feed the best low-res mask back, as in interactive use.
    mask_input = first[2][np.argmax(first[1])][None]
    for multimask in (False, True):
        with torch.no_grad():
            expected = op.predict(mask_input=mask_input, multimask_output=multimask, **kw)
            logits = op.predict(
                mask_input=mask_input, multimask_output=multimask, return_logits=True, **kw
            )[0]
        got = ours.predict(mask_input=mask_input, multimask_output=multimask, **kw)
        assert_outputs_match(got, expected, logits)
    # A mask alone (no sparse prompt at all) is valid in the official API.
    with torch.no_grad():
        expected = op.predict(mask_input=mask_input, multimask_output=False)
        logits = op.predict(mask_input=mask_input, multimask_output=False, return_logits=True)[0]
    got = ours.predict(mask_input=mask_input, multimask_output=False)
    assert_outputs_match(got, expected, logits)


def test_predict_batch_matches_official_loop_and_predict_torch(predictors):
    op, ours = predictors["coffee_portrait"]
    image = PHOTOS["coffee_portrait"]
    rng = np.random.default_rng(0)
    h, w = image.shape[:2]
    b = 5
    coords = rng.uniform(0, 1, size=(b, 3, 2)) * [w, h]
    labels = rng.integers(0, 2, size=(b, 3))
    x0y0 = rng.uniform(0, 0.5, size=(b, 2)) * [w, h]
    boxes = np.concatenate([x0y0, x0y0 + rng.uniform(0.1, 0.5, size=(b, 2)) * [w, h]], axis=1)
    got = ours.predict_batch(coords, labels, boxes, multimask_output=True)
    assert got[0].shape == (b, 3, h, w) and got[1].shape == (b, 3)
    assert got[2].shape == (b, 3, 64, 64)
    t = op.transform
    with torch.no_grad():
        expected = op.predict_torch(
            t.apply_coords_torch(torch.as_tensor(coords, dtype=torch.float), image.shape[:2]),
            torch.as_tensor(labels, dtype=torch.int),
            t.apply_boxes_torch(torch.as_tensor(boxes, dtype=torch.float), image.shape[:2]),
            multimask_output=True,
            return_logits=True,
        )
    assert rel_err(got[2], expected[2].numpy()) <= TOL
    np.testing.assert_allclose(got[1], expected[1].numpy(), rtol=0, atol=TOL)
    assert_masks_match(got[0], expected[0].numpy())
    # The same as a loop of official predict calls.
    for i in range(b):
        with torch.no_grad():
            one = op.predict(coords[i], labels[i], boxes[i], multimask_output=True)
            logits = op.predict(
                coords[i], labels[i], boxes[i], multimask_output=True, return_logits=True
            )[0]
        assert_outputs_match(tuple(o[i] for o in got), one, logits)
    # Mask inputs per prompt.
    mask_input = expected[2][:, :1].numpy()
    got = ours.predict_batch(coords, labels, boxes, mask_input=mask_input)
    for i in range(b):
        with torch.no_grad():
            kw = dict(box=boxes[i], mask_input=mask_input[i])
            one = op.predict(coords[i], labels[i], **kw)
            logits = op.predict(coords[i], labels[i], return_logits=True, **kw)[0]
        assert_outputs_match(tuple(o[i] for o in got), one, logits)


def test_changing_prompt_sizes_compile_few_times(pair):
    official, model, params = pair
    image = PHOTOS["chelsea"]
    ours = SamPredictor(model, params)
    ours.set_image(image)
    op = OfficialPredictor(official)
    with torch.no_grad():
        op.set_image(image)
    rng = np.random.default_rng(1)
    coords = rng.uniform(0, 300, size=(7, 2))
    labels = rng.integers(0, 2, size=7)
    before = F.compiled_versions()
    for n in range(1, 8):  # 2..8 tokens (with the official padding point): buckets 2, 4, 8
        got = ours.predict(coords[:n], labels[:n], multimask_output=True)
        if n in (3, 7):  # padded with PAD_LABEL slots: still the official result
            with torch.no_grad():
                expected = op.predict(coords[:n], labels[:n], multimask_output=True)
                logits = op.predict(coords[:n], labels[:n], return_logits=True)[0]
            assert_outputs_match(got, expected, logits)
    for p in range(1, 9):  # 1..8 prompts of 6 points (7 tokens): one (8, 8) bucket
        got = ours.predict_batch(np.tile(coords[None, :6], (p, 1, 1)), np.tile(labels[:6], (p, 1)))
        assert got[0].shape[0] == p and got[1].shape == (p, 3)
        np.testing.assert_array_equal(got[0][-1], got[0][0])
    after = F.compiled_versions()
    assert after["decode"] - before["decode"] <= 4
    assert after["postprocess_padded"] - before["postprocess_padded"] <= 2
    assert after["encode"] == before["encode"]


def test_bgr_image_format(predictors):
    _, rgb = predictors["chelsea"]
    bgr = SamPredictor(rgb.model, rgb.params)
    bgr.set_image(np.ascontiguousarray(PHOTOS["chelsea"][..., ::-1]), image_format="BGR")
    np.testing.assert_array_equal(
        np.asarray(bgr.get_image_embedding()), np.asarray(rgb.get_image_embedding())
    )


def test_reset_image_and_predict_before_set_image(pair):
    _, model, params = pair
    p = SamPredictor(model, params)
    with pytest.raises(RuntimeError, match="set_image"):
        p.predict(np.array([[1.0, 2.0]]), np.array([1]))
    with pytest.raises(RuntimeError, match="set_image"):
        p.get_image_embedding()
    p.set_image(PHOTOS["chelsea"][:40, :50])
    assert p.is_image_set and p.original_size == (40, 50) and p.input_size == (205, 256)
    p.reset_image()
    assert p.original_size is None
    with pytest.raises(RuntimeError, match="set_image"):
        p.predict_batch(boxes=np.array([[1.0, 2.0, 3.0, 4.0]]))


@pytest.fixture(scope="module")
def ready(pair):
    _, model, params = pair
    p = SamPredictor(model, params)
    p.set_image(PHOTOS["chelsea"][:40, :50])
    return p


IMAGE_ERRORS = [
    (np.zeros((10, 10), np.uint8), "RGB", r"\(H, W, 3\)"),
    (np.zeros((10, 10, 4), np.uint8), "RGB", r"\(H, W, 3\)"),
    (np.zeros((10, 10, 3), np.float32), "RGB", "uint8"),
    (np.zeros((0, 10, 3), np.uint8), "RGB", "empty"),
    (np.zeros((10, 10, 3), np.uint8), "rgb", "image_format"),
]


@pytest.mark.parametrize("image,fmt,match", IMAGE_ERRORS)
def test_set_image_errors(ready, image, fmt, match):
    with pytest.raises(ValueError, match=match):
        ready.set_image(image, image_format=fmt)


PREDICT_ERRORS = [
    (dict(point_coords=np.array([[1.0, 2.0]])), "point_labels must be supplied"),
    (dict(point_labels=np.array([1])), "without point_coords"),
    (dict(point_coords=np.array([[1.0, 2.0]]), point_labels=np.array([1, 0])), "does not match"),
    (dict(point_coords=np.array([1.0, 2.0]), point_labels=np.array([1])), r"\(N, 2\)"),
    (dict(point_coords=np.array([[1.0, 2.0]]), point_labels=np.array([2])), "1 .* or 0"),
    (dict(point_coords=np.array([[np.nan, 2.0]]), point_labels=np.array([1])), "NaN"),
    (dict(point_coords=np.array([[np.inf, 2.0]]), point_labels=np.array([1])), "NaN or inf"),
    (dict(box=np.array([1.0, 2.0, 3.0])), "4 numbers"),
    (dict(box=np.array([5.0, 2.0, 3.0, 4.0])), "x0 <= x1"),
    (dict(box=np.array([1.0, 5.0, 3.0, 4.0])), "y0 <= y1"),
    (dict(box=np.array([1.0, np.nan, 3.0, 4.0])), "NaN"),
    (dict(box=["a", 1, 2, 3]), "numeric"),
    (dict(box=np.zeros(4), mask_input=np.zeros((1, 256, 256))), r"\(1, 64, 64\)"),
    (dict(box=np.zeros(4), mask_input=np.zeros((64, 64))), r"\(1, 64, 64\)"),
]


@pytest.mark.parametrize("kwargs,match", PREDICT_ERRORS)
def test_predict_errors(ready, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ready.predict(**kwargs)


BATCH_ERRORS = [
    (dict(point_coords=np.zeros((2, 3, 2)), point_labels=np.zeros((3, 3))), "does not match"),
    (dict(point_coords=np.zeros((3, 2)), point_labels=np.zeros(3)), r"\(B, N, 2\)"),
    (
        dict(point_coords=np.zeros((2, 1, 2)), point_labels=np.ones((2, 1)), boxes=np.ones((3, 4))),
        "disagree",
    ),
    (dict(boxes=np.ones((2, 4)), mask_input=np.zeros((3, 1, 64, 64))), "disagree"),
    (dict(boxes=np.ones(4)), r"\(B, 4\)"),
    (dict(boxes=np.ones((2, 4)), mask_input=np.zeros((2, 2, 64, 64))), r"\(B, 1, 64, 64\)"),
    (dict(), "needs point_coords, boxes or mask_input"),
    (dict(boxes=np.zeros((0, 4))), "empty"),
]


@pytest.mark.parametrize("kwargs,match", BATCH_ERRORS)
def test_predict_batch_errors(ready, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ready.predict_batch(**kwargs)


def _iou(a, b):
    return np.logical_and(a, b).sum() / max(np.logical_or(a, b).sum(), 1)


def test_bfloat16_masks_agree_with_float32(pair, predictors):
    """bf16 compute (params, LayerNorm and softmax in f32) vs f32, every photo, prompt kind and
    multimask setting: mean mask IoU >= 0.99 (issue 3).

    With random weights the logits are small and flat (max ~0.3), so bf16 rounding (~1% relative
    on the low-res logits) can move borderline pixels: measured mean IoU 0.995 over the 48 masks,
    lowest 0.93 (a single-mask output of one click).
    """
    _, model, params = pair
    bf16 = SamPredictor(build_sam(CONFIG, dtype=jnp.bfloat16), params)
    ious = []
    for name, (_, f32) in predictors.items():
        bf16.set_image(PHOTOS[name])
        assert rel_err(bf16.get_image_embedding(), f32.get_image_embedding()) <= 0.03
        for kw in _prompts(PHOTOS[name]).values():
            for multimask in (True, False):
                a = f32.predict(multimask_output=multimask, **kw)
                b = bf16.predict(multimask_output=multimask, **kw)
                assert rel_err(b[2], a[2]) <= 0.06  # measured at most 0.051
                np.testing.assert_allclose(b[1], a[1], atol=0.01)
                ious += [_iou(x, y) for x, y in zip(a[0], b[0], strict=True)]
    assert len(ious) == 48
    assert np.mean(ious) >= 0.99, ious
    assert min(ious) >= 0.9, ious


@pytest.mark.slow
def test_vit_b_end_to_end_matches_official():
    config = get_config("vit_b")
    official, params = make_pair(config, seed=3)
    image = PHOTOS["chelsea"]
    op, ours = OfficialPredictor(official), SamPredictor(build_sam(config), params)
    with torch.no_grad():
        op.set_image(image)
    ours.set_image(image)
    emb = op.get_image_embedding().permute(0, 2, 3, 1).numpy()
    assert rel_err(ours.get_image_embedding(), emb) <= TOL
    for kind in ("point", "box_points"):
        kw = _prompts(image)[kind]
        with torch.no_grad():
            expected = op.predict(**kw)
            logits = op.predict(return_logits=True, **kw)[0]
        got = ours.predict(**kw)
        assert got[0].shape == (3, *image.shape[:2]) and got[2].shape == (3, 256, 256)
        assert_outputs_match(got, expected, logits)
