"""Tests of the interactive prompt simulation (sam_jax.training.prompt_sampling)."""

import jax
import jax.numpy as jnp
import numpy as np

from sam_jax.training import prompt_sampling as ps

PAD = ps.PAD_LABEL


def test_pad_label_matches_model():
    from sam_jax.modeling import PAD_LABEL

    assert PAD == PAD_LABEL


def test_sampled_point_lands_in_its_cell_in_the_input_frame():
    m, s_img = 16, 64  # 4 input pixels per cell
    idx = jnp.arange(m * m)
    xy = np.asarray(ps.cell_to_coords(jax.random.key(0), idx, m, s_img))
    pos = xy + 0.5  # the model's pixel-centre shift
    scale = s_img / m
    np.testing.assert_array_equal(np.floor(pos[:, 0] / scale), np.asarray(idx) % m)
    np.testing.assert_array_equal(np.floor(pos[:, 1] / scale), np.asarray(idx) // m)


def test_uniform_cell_sampling_inside_region_and_empty():
    region = np.zeros((2000, 4, 4), bool)
    region[:, 1, 2] = region[:, 3, 0] = region[:, 0, 0] = True
    region[0] = False
    idx, found = ps.sample_uniform_cell(jax.random.key(1), jnp.asarray(region))
    idx, found = np.asarray(idx), np.asarray(found)
    assert not found[0] and found[1:].all()
    counts = np.bincount(idx[1:], minlength=16)
    assert set(np.flatnonzero(counts)) == {0, 6, 12}
    np.testing.assert_allclose(counts[[0, 6, 12]] / 1999, 1 / 3, atol=0.05)


def test_mask_boxes_in_input_pixels():
    mask = np.zeros((1, 8, 8), bool)
    mask[0, 2:5, 1:3] = True  # rows 2..4, cols 1..2
    box = np.asarray(ps.mask_boxes(jnp.asarray(mask), 32))[0]  # 4 px per cell
    np.testing.assert_allclose(box, [4, 8, 11, 19])


def test_box_noise_std_and_cap():
    boxes = jnp.tile(jnp.array([[100.0, 100.0, 300.0, 140.0]]), (4000, 1))
    hw = jnp.array([1024, 1024])
    noisy = np.asarray(ps.noisy_boxes(jax.random.key(2), boxes, hw, 0.1, 20.0))
    d = noisy - np.asarray(boxes)
    # x side 200 -> std min(20, 20) = 20; y side 40 -> std 4.
    np.testing.assert_allclose(d[:, 0].std(), 20, rtol=0.1)
    np.testing.assert_allclose(d[:, 1].std(), 4, rtol=0.1)
    capped = np.asarray(ps.noisy_boxes(jax.random.key(3), boxes, hw, 0.1, 2.0)) - np.asarray(boxes)
    np.testing.assert_allclose(capped[:, 0].std(), 2, rtol=0.1)
    assert (noisy[:, 0] <= noisy[:, 2]).all() and (noisy >= 0).all() and (noisy <= 1023).all()


def _square_masks(b=64, n=4, m=16):
    masks = np.zeros((b, n, m, m), bool)
    masks[..., 4:10, 3:8] = True
    return jnp.asarray(masks)


def test_initial_prompts_layout():
    masks = _square_masks()
    k = 3
    out = ps.initial_prompts(jax.random.key(4), masks, jnp.full((64, 2), 64), 64, k)
    labels, points = np.asarray(out["labels"]), np.asarray(out["points"])
    is_box = np.asarray(out["is_box"])
    assert 0.35 < is_box.mean() < 0.65
    np.testing.assert_array_equal(labels[is_box][:, k + 1 :], np.tile([2, 3], (is_box.sum(), 1)))
    np.testing.assert_array_equal(labels[is_box][:, : k + 1], PAD)
    np.testing.assert_array_equal(labels[~is_box][:, 0], 1)
    np.testing.assert_array_equal(labels[~is_box][:, 1:k], PAD)
    np.testing.assert_array_equal(labels[~is_box][:, k], -1)  # official padding point
    np.testing.assert_array_equal(labels[~is_box][:, k + 1 :], PAD)
    np.testing.assert_array_equal(np.asarray(out["num_clicks"]), np.where(is_box, 0, 1))
    # Points lie inside the mask (cells 4..9 x 3..7 of 16, 4 px per cell).
    p = points[~is_box][:, 0] + 0.5
    assert ((p[:, 0] >= 12) & (p[:, 0] < 32) & (p[:, 1] >= 16) & (p[:, 1] < 40)).all()


def test_correction_click_positive_and_negative():
    gt = _square_masks(b=1, n=2)
    prompts = ps.initial_prompts(jax.random.key(5), gt, jnp.array([[64, 64]]), 64, 3, box_prob=0.0)
    pred = np.zeros((1, 2, 16, 16), bool)
    pred[0, 1] = True  # mask 0: empty prediction (FN only); mask 1: everything (FP outside gt)
    pred[0, 1, 4:10, 3:8] = True
    out = ps.add_correction_click(jax.random.key(6), prompts, jnp.asarray(pred), gt, 64)
    labels, points = np.asarray(out["labels"])[0], np.asarray(out["points"])[0]
    np.testing.assert_array_equal(np.asarray(out["num_clicks"]), [[2, 2]])
    assert labels[0, 1] == 1 and labels[1, 1] == 0
    cell = np.floor((points[:, 1] + 0.5) / 4).astype(int)  # (x, y) cells of the new clicks
    assert gt[0, 0, cell[0, 1], cell[0, 0]] and not gt[0, 1, cell[1, 1], cell[1, 0]]


def test_correction_click_skips_when_no_error_no_slot_or_not_asked():
    gt = _square_masks(b=1, n=3)
    prompts = ps.initial_prompts(jax.random.key(7), gt, jnp.array([[64, 64]]), 64, 1, box_prob=0.0)
    # mask 0: perfect prediction; masks 1, 2: empty prediction, but mask 2 is not asked.
    pred = np.asarray(gt).copy()
    pred[0, 1:] = False
    add = jnp.array([[True, True, False]])
    out = ps.add_correction_click(jax.random.key(8), prompts, jnp.asarray(pred), gt, 64, add)
    # K = 1 slot, already used by the first point: nothing is written anywhere.
    np.testing.assert_array_equal(out["labels"], prompts["labels"])
    np.testing.assert_array_equal(out["num_clicks"], prompts["num_clicks"])
    prompts2 = ps.initial_prompts(jax.random.key(7), gt, jnp.array([[64, 64]]), 64, 2, box_prob=0.0)
    out2 = ps.add_correction_click(jax.random.key(8), prompts2, jnp.asarray(pred), gt, 64, add)
    np.testing.assert_array_equal(np.asarray(out2["num_clicks"]), [[1, 2, 1]])


def test_point_round_schedule_matches_paper():
    sched = np.asarray(ps.point_round_schedule(jax.random.key(9), (500,), 11))
    assert sched.shape == (10, 500)
    np.testing.assert_array_equal(sched.sum(axis=0), 8)  # 8 clicks in 10 correction rounds
    assert not sched[-1].any()  # the last round never adds a point
    skipped = np.argmin(sched[:-1], axis=0)
    assert set(skipped) == set(range(9))  # the other no-point round is anywhere before
