"""Tests of the train-step pieces: all-outputs decoding, image normalisation, valid masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam_jax.config import PIXEL_MEAN, PIXEL_STD, tiny_config
from sam_jax.modeling import build_sam
from sam_jax.training import train_step


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_decode_all_outputs_equals_both_decode_calls(dtype):
    config = tiny_config(image_size=64, encoder_depth=1, encoder_global_attn_indexes=(0,))
    model = build_sam(config, dtype=dtype)
    params = model.init_params(jax.random.key(0))
    rng = np.random.default_rng(0)
    b, p, g, d, m = 2, 3, config.embedding_size, config.prompt_embed_dim, config.low_res_size
    emb = jnp.asarray(rng.normal(size=(b, g, g, d)), jnp.float32)
    points = jnp.asarray(rng.uniform(0, 64, (b, p, 4, 2)), jnp.float32)
    labels = jnp.asarray([[[1, 0, -1, -10], [2, 3, 1, -10], [1, -10, -1, -10]]] * b, jnp.int32)
    mask_input = jnp.asarray(rng.normal(size=(b, p, m, m)), jnp.float32)
    has_mask = jnp.asarray([[True, False, True], [False, True, True]])

    logits, iou = jax.jit(train_step.decode_all_outputs, static_argnums=0)(
        model, params, emb, points, labels, mask_input, has_mask
    )
    assert logits.shape == (b, p, 4, m, m) and iou.shape == (b, p, 4)

    def decode(multi):
        return model.apply(
            {"params": params},
            emb,
            points,
            labels,
            mask_input,
            has_mask,
            multi,
            method=model.decode,
        )

    single, iou1 = decode(False)
    multi, iou3 = decode(True)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(logits[:, :, :1], single, rtol=tol, atol=tol)
    np.testing.assert_allclose(logits[:, :, 1:], multi, rtol=tol, atol=tol)
    np.testing.assert_allclose(iou[:, :, :1], iou1, rtol=tol, atol=tol)
    np.testing.assert_allclose(iou[:, :, 1:], iou3, rtol=tol, atol=tol)


def test_normalize_images_zeroes_padding():
    image = np.full((2, 8, 8, 3), 200, np.uint8)
    hw = jnp.array([[8, 8], [5, 3]])
    x = np.asarray(train_step.normalize_images(jnp.asarray(image), hw))
    want = (200 - np.asarray(PIXEL_MEAN)) / np.asarray(PIXEL_STD)
    np.testing.assert_allclose(x[0], np.broadcast_to(want, (8, 8, 3)), rtol=1e-6)
    np.testing.assert_allclose(x[1, :5, :3], np.broadcast_to(want, (5, 3, 3)), rtol=1e-6)
    assert not x[1, 5:].any() and not x[1, :, 3:].any()


def test_valid_masks_drops_empty_and_large_masks():
    masks = np.zeros((1, 4, 8, 8), np.uint8)
    masks[0, 0, :2, :2] = 1  # small
    masks[0, 2, :, :] = 1  # whole padded frame: > 90% of a 32x32 image in a 32x32 frame
    masks[0, 3, :4, :4] = 1  # 16 of the 16 image cells of a 16x16 image -> 100%: dropped
    batch = {
        "masks": jnp.asarray(masks),
        "mask_valid": jnp.array([[True, True, True, True]]),
        "image_hw": jnp.array([[16, 16]]),
    }
    valid = np.asarray(train_step.valid_masks(batch, 32, 0.9))
    np.testing.assert_array_equal(valid, [[True, False, False, False]])
    batch["image_hw"] = jnp.array([[32, 32]])  # 64 image cells: mask 3 covers 25%
    valid = np.asarray(train_step.valid_masks(batch, 32, 0.9))
    np.testing.assert_array_equal(valid, [[True, False, False, True]])


def test_mask_prompt_rounds():
    add = jnp.array([False, True, True, False, True, False])[:, None] & jnp.ones((6, 500), bool)
    has = np.asarray(train_step.mask_prompt_rounds(jax.random.key(0), add, 0.25))
    assert not has[0].any()  # round 0: no previous mask
    assert has[[3, 5]].all()  # rounds without a click always refine the previous mask
    frac = has[[1, 2, 4]].mean()
    assert 0.2 < frac < 0.3  # rounds with a click: with probability 0.25
    always = np.asarray(train_step.mask_prompt_rounds(jax.random.key(1), add, 1.0))
    assert always[1:].all() and not always[0].any()


def test_num_click_slots():
    # 11 rounds: the first point + 8 correction clicks.
    assert train_step.num_click_slots(11) == 9
    assert train_step.num_click_slots(1) == 1
    assert train_step.num_click_slots(2) == 2
    assert train_step.num_click_slots(7) == 5
