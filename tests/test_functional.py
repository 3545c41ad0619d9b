"""sam_jax.functional: several images, each with its own prompts, in one call vs official SAM."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
import torch
from segment_anything import SamPredictor as OfficialPredictor
from segment_anything.utils.transforms import ResizeLongestSide

from sam_jax import functional as F
from sam_jax.checkpoints.mapping import state_dict_to_params
from sam_jax.config import tiny_config
from sam_jax.modeling import PAD_LABEL, build_sam
from sam_jax.prompts import pack_prompts
from tests.torch_reference import build_official, rel_err, state_dict_numpy

TOL = 1e-4
# The config of test_predictor (the jit caches are shared).
CONFIG = tiny_config(image_size=256, window_size=5)
S = CONFIG.image_size


def _photos():
    coffee = skimage.data.coffee()
    return [
        skimage.data.chelsea(),  # 300 x 451
        np.ascontiguousarray(coffee.transpose(1, 0, 2)),  # 600 x 400
        skimage.data.astronaut(),  # 512 x 512
    ]


PHOTOS = _photos()

# Per image, a list of prompt groups (one kind per group), in original-image pixels.
PROMPTS = [
    [
        dict(point_coords=[[[250.0, 150.0], [40, 30], [400, 250]]], point_labels=[[1, 0, 0]]),
        dict(boxes=[[60.0, 40, 380, 280]]),
    ],
    [
        dict(
            boxes=[[50.0, 100, 300, 500]],
            point_coords=[[[200.0, 300.0], [20, 20]]],
            point_labels=[[1, 0]],
        )
    ],
    [dict(point_coords=[[[256.0, 200.0]], [[100.0, 400.0]]], point_labels=[[1], [1]])],
]


def _official_prompt_list(groups):
    """The prompts of one image as a list of kwargs for the official predict (one prompt each)."""
    out = []
    for g in groups:
        num = len(g.get("boxes", g.get("point_coords")))
        for j in range(num):
            kw = {}
            if "point_coords" in g:
                kw["point_coords"] = np.asarray(g["point_coords"][j])
                kw["point_labels"] = np.asarray(g["point_labels"][j])
            if "boxes" in g:
                kw["box"] = np.asarray(g["boxes"][j])
            out.append(kw)
    return out


@pytest.fixture(scope="module")
def setup():
    official = build_official(CONFIG, seed=0)
    params = jax.tree_util.tree_map(
        jnp.asarray, state_dict_to_params(state_dict_numpy(official), CONFIG)
    )
    model = build_sam(CONFIG)
    images, input_sizes, original_sizes = F.preprocess_images(PHOTOS, S)
    per_image = [
        [F.pack_image_prompts(original_sizes[i], S, **g) for g in groups]
        for i, groups in enumerate(PROMPTS)
    ]
    points, labels, valid = F.stack_prompts(per_image)
    emb = F.encode_images(model, params, jnp.asarray(images))
    low_res, iou = F.decode_prompts(model, params, emb, points, labels, multimask_output=True)
    expected = []  # per image: (embedding, [(masks, iou, low_res, logits) per prompt])
    op = OfficialPredictor(official)
    for image, groups in zip(PHOTOS, PROMPTS, strict=True):
        with torch.no_grad():
            op.set_image(image)
            outs = []
            for kw in _official_prompt_list(groups):
                masks, scores, low = op.predict(**kw)
                logits = op.predict(return_logits=True, **kw)[0]
                outs.append((masks, scores, low, logits))
        expected.append((op.get_image_embedding().permute(0, 2, 3, 1).numpy()[0], outs))
    return dict(
        model=model, params=params, images=images, input_sizes=input_sizes,
        original_sizes=original_sizes, points=points, labels=labels, valid=valid, emb=emb,
        low_res=low_res, iou=iou, expected=expected,
    )  # fmt: skip


def test_preprocess_images_matches_official():
    images, input_sizes, original_sizes = F.preprocess_images(PHOTOS, S)
    assert images.shape == (3, S, S, 3) and images.dtype == np.float32
    mean = np.array([123.675, 116.28, 103.53], np.float32)
    std = np.array([58.395, 57.12, 57.375], np.float32)
    for i, photo in enumerate(PHOTOS):
        resized = ResizeLongestSide(S).apply_image(photo)
        h, w = resized.shape[:2]
        assert tuple(input_sizes[i]) == (h, w) and tuple(original_sizes[i]) == photo.shape[:2]
        np.testing.assert_array_equal(images[i, :h, :w], (resized.astype(np.float32) - mean) / std)
        assert not images[i, h:].any() and not images[i, :, w:].any()
    with pytest.raises(ValueError, match="list"):
        F.preprocess_images(PHOTOS[0], S)
    with pytest.raises(ValueError, match=r"images\[1\].*uint8"):
        F.preprocess_images([PHOTOS[0], PHOTOS[1].astype(np.float32)], S)


def test_prompt_packing_layout(setup):
    points, labels, valid = setup["points"], setup["labels"], setup["valid"]
    assert points.shape == (3, 2, 4, 2) and labels.shape == (3, 2, 4)
    np.testing.assert_array_equal(valid, [[True, True], [True, False], [True, True]])
    # Image 0: three points + the official padding point; then a box padded with PAD_LABEL.
    np.testing.assert_array_equal(labels[0], [[1, 0, 0, -1], [2, 3, PAD_LABEL, PAD_LABEL]])
    # Image 1: two points then the box corners (no padding point with a box); row 1 = row 0 copy.
    np.testing.assert_array_equal(labels[1], [[1, 0, 2, 3], [1, 0, 2, 3]])
    np.testing.assert_array_equal(labels[2], [[1, -1, PAD_LABEL, PAD_LABEL]] * 2)
    # Coordinates are in the resized input frame (official ResizeLongestSide).
    rlt = ResizeLongestSide(S)
    box = rlt.apply_boxes(np.array([[60.0, 40, 380, 280]]), (300, 451))
    np.testing.assert_allclose(points[0, 1, :2], box.reshape(2, 2))
    assert F.bucket_size(1) == 1 and F.bucket_size(5) == 8 and F.bucket_size(8) == 8
    assert F.bucket_size(0) == 1 and F.bucket_size(3, minimum=16) == 16
    # No sparse prompt (e.g. mask only): PAD_LABEL slots only.
    pts, labs = F.pack_image_prompts((10, 20), S, pad_to=2)
    assert pts.shape == (1, 2, 2) and (labs == PAD_LABEL).all()
    with pytest.raises(ValueError, match="do not fit"):
        F.stack_prompts([(points[0], labels[0])], num_tokens=2)
    with pytest.raises(ValueError, match="disagree"):
        F.stack_prompts([(points[0], labels[0, :, :3])])


def test_multi_image_encode_decode_matches_official(setup):
    low_res, iou = np.asarray(setup["low_res"]), np.asarray(setup["iou"])
    assert low_res.shape == (3, 2, 3, 64, 64) and iou.shape == (3, 2, 3)
    for i, (emb, outs) in enumerate(setup["expected"]):
        assert rel_err(setup["emb"][i], emb) <= TOL
        logits = F.postprocess_masks(
            setup["low_res"][i], setup["input_sizes"][i], setup["original_sizes"][i], S
        )
        masks = F.postprocess_masks(
            setup["low_res"][i], setup["input_sizes"][i], setup["original_sizes"][i], S, 0.0
        )
        assert masks.dtype == bool and masks.shape == (2, 3, *PHOTOS[i].shape[:2])
        np.testing.assert_array_equal(np.asarray(masks), np.asarray(logits) > 0)
        assert len(outs) == setup["valid"][i].sum()
        for j, (o_masks, o_iou, o_low, o_logits) in enumerate(outs):
            assert rel_err(low_res[i, j], o_low) <= TOL
            np.testing.assert_allclose(iou[i, j], o_iou, rtol=0, atol=TOL)
            assert rel_err(logits[j], o_logits) <= TOL
            differ = np.asarray(masks[j]) != o_masks
            assert np.all(np.abs(o_logits[differ]) <= TOL * np.abs(o_logits).max())


def test_usable_inside_user_jit_and_vmap(setup):
    model = setup["model"]
    # Two groups of prompts (the second with its prompt order reversed) under vmap, inside jit,
    # with the encoder in the same user function.
    points = np.stack([setup["points"], setup["points"][:, ::-1]])
    labels = np.stack([setup["labels"], setup["labels"][:, ::-1]])

    @jax.jit
    def user_fn(params, images, points, labels):
        emb = F.encode_images(model, params, images)
        decode = lambda p, lab: F.decode_prompts(model, params, emb, p, lab, multimask_output=True)
        return jax.vmap(decode)(points, labels)

    low_res, iou = user_fn(setup["params"], setup["images"], points, labels)
    assert low_res.shape == (2, 3, 2, 3, 64, 64)
    for k, order in enumerate([slice(None), slice(None, None, -1)]):
        assert rel_err(low_res[k], np.asarray(setup["low_res"])[:, order]) <= 1e-5
        np.testing.assert_allclose(iou[k], np.asarray(setup["iou"])[:, order], atol=1e-6)
    # postprocess_masks vmaps over prompts too.
    i = 1
    args = (tuple(setup["input_sizes"][i]), tuple(setup["original_sizes"][i]), S)
    direct = F.postprocess_masks(setup["low_res"][i], *args)
    mapped = jax.vmap(lambda x: F.postprocess_masks(x, *args))(setup["low_res"][i])
    np.testing.assert_array_equal(np.asarray(mapped), np.asarray(direct))


def test_postprocess_masks_padded_equals_postprocess_masks_and_shares_compiles():
    rng = np.random.default_rng(0)
    low_res = jnp.asarray(
        rng.normal(size=(2, 3, 4 * CONFIG.embedding_size, 4 * CONFIG.embedding_size))
    )
    before = F.compiled_versions()["postprocess_padded"]
    # Four image sizes, one padded size (128, 192) and one resized input extent: one compile each.
    for hw in [(97, 150), (100, 160), (110, 170), (128, 192)]:
        input_size = tuple(int(v) for v in ResizeLongestSide(S).get_preprocess_shape(*hw, S))
        for thr in (None, 0.0):
            want = np.asarray(F.postprocess_masks(low_res, input_size, hw, S, thr))
            got = np.asarray(F.postprocess_masks_padded(low_res, input_size, hw, S, thr))
            assert got.shape == (2, 3, 128, 192) and got.dtype == want.dtype
            np.testing.assert_allclose(got[..., : hw[0], : hw[1]], want, rtol=0, atol=1e-6)
            assert not got[..., hw[0] :, :].any() and not got[..., :, hw[1] :].any()
    assert F.compiled_versions()["postprocess_padded"] - before == 2  # logits and masks
    with pytest.raises(ValueError, match="fit"):
        F.postprocess_masks_padded(low_res, (300, 10), (10, 10), S)


def test_prompts_decoded_and_postprocessed_in_chunks(setup, monkeypatch):
    """With a chunk of 2 prompts, 5 prompts (padded to 6, 3 chunks under lax.map) decode and
    post-process to the results of one pass over all of them."""
    model, params, emb = setup["model"], setup["params"], setup["emb"][:1]
    rng = np.random.default_rng(1)
    points = jnp.asarray(rng.uniform(0, S, size=(1, 5, 2, 2)), jnp.float32)
    labels = jnp.asarray([[[1, 0]] * 5], jnp.int32)
    masks = jnp.asarray(rng.normal(size=(1, 5, 64, 64)), jnp.float32)
    has_mask = jnp.asarray([[True, False, True, True, False]])
    args = (tuple(setup["input_sizes"][0]), tuple(setup["original_sizes"][0]), S)
    whole = F.decode_prompts(model, params, emb, points, labels, masks, has_mask)
    whole_masks = F.postprocess_masks(whole[0][0], *args, 0.0)
    whole_padded = F.postprocess_masks_padded(whole[0][0], *args)
    calls = []
    map_ = jax.lax.map
    monkeypatch.setattr(jax.lax, "map", lambda f, xs: calls.append(1) or map_(f, xs))
    monkeypatch.setitem(F.PROMPT_CHUNK, jax.default_backend(), 2)
    assert F.prompt_chunk() == 2
    low, iou = F.decode_prompts(model, params, emb, points, labels, masks, has_mask)
    assert low.shape == (1, 5, 3, 64, 64) and iou.shape == (1, 5, 3)
    np.testing.assert_allclose(np.asarray(low), np.asarray(whole[0]), rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(iou), np.asarray(whole[1]), rtol=0, atol=1e-6)
    got = F.postprocess_masks(whole[0][0], *args, 0.0)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(whole_masks))
    got = F.postprocess_masks_padded(whole[0][0], *args)
    np.testing.assert_allclose(np.asarray(got), np.asarray(whole_padded), rtol=0, atol=1e-6)
    assert len(calls) == 3  # one lax.map per function: the chunked paths ran


PACK_ERRORS = [
    (dict(point_coords=np.zeros((1, 2, 2))), "point_labels must be given"),
    (dict(point_labels=np.ones((1, 2))), "without point_coords"),
    (dict(point_coords=np.zeros((2, 2)), point_labels=np.ones((2,))), r"\(P, N, 2\)"),
    (dict(point_coords=np.zeros((1, 2, 2)), point_labels=np.ones((1, 3))), r"\(P, N\)"),
    (dict(boxes=np.zeros((4,))), r"\(P, 4\)"),
    (
        dict(point_coords=np.zeros((2, 1, 2)), point_labels=np.ones((2, 1)), boxes=np.ones((3, 4))),
        "3 boxes for 2",
    ),
    (dict(boxes=np.zeros((1, 4)), pad_to=1), "smaller than the 2 prompt tokens"),
]


@pytest.mark.parametrize("kwargs,match", PACK_ERRORS)
def test_prompt_packing_errors_at_the_public_boundary(kwargs, match):
    """F.pack_image_prompts and sam_jax.pack_prompts check the same contract (check_prompts)."""
    with pytest.raises(ValueError, match=match):
        F.pack_image_prompts((10, 20), S, **kwargs)
    with pytest.raises(ValueError, match=match):
        pack_prompts(**kwargs)


def test_pack_prompts_needs_a_prompt():
    with pytest.raises(ValueError, match="needs point_coords or boxes"):
        pack_prompts()


def test_decode_prompts_shape_errors(setup):
    model, params, emb = setup["model"], setup["params"], setup["emb"]
    points, labels = setup["points"], setup["labels"]
    cases = [
        ((emb[..., :8], points, labels), {}, "image_embeddings"),
        ((emb, points, labels[:2]), {}, "labels"),
        ((emb, points[..., :1], labels), {}, "points"),
        ((emb, points, labels), dict(mask_input=np.zeros((3, 2, 32, 32))), "mask_input"),
        ((emb, points, labels), dict(has_mask=np.ones((3, 2), bool)), "without mask_input"),
    ]
    for args, kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            F.decode_prompts(model, params, *args, **kwargs)
    with pytest.raises(ValueError, match="images must have shape"):
        F.encode_images(model, params, jnp.zeros((1, 128, 128, 3)))
    with pytest.raises(ValueError, match="fit"):
        F.postprocess_masks(jnp.zeros((64, 64)), (300, 10), (10, 10), S)


def test_encode_images_one_at_a_time_is_the_same_function(setup):
    """A batch encoded one image after the other (lax.map, the CPU default) equals the batch
    encoded at once, image by image in order."""
    model, params, images = setup["model"], setup["params"], jnp.asarray(setup["images"])
    assert jax.default_backend() == "cpu"
    mapped = np.asarray(F.encode_images(model, params, images, one_at_a_time=True))
    batched = np.asarray(F.encode_images(model, params, images, one_at_a_time=False))
    np.testing.assert_allclose(mapped, batched, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(setup["emb"]), mapped)  # the CPU default
    for i in range(len(images)):  # not mixed up: each image's own embedding
        alone = np.asarray(F.encode_images(model, params, images[i : i + 1]))
        np.testing.assert_allclose(mapped[i], alone[0], rtol=0, atol=1e-5)
