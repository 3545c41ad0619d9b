"""Tests of sam_jax.training.losses against torchvision / direct formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torchvision.ops import sigmoid_focal_loss as tv_focal

from sam_jax.evaluation.metrics import mask_iou
from sam_jax.training import losses


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (2, 3, 8, 8)).astype(np.float32)
    targets = (rng.uniform(size=(2, 3, 8, 8)) < 0.4).astype(np.float32)
    return logits, targets


def test_focal_matches_torchvision_per_mask_mean(data):
    logits, targets = data
    ref = tv_focal(torch.tensor(logits), torch.tensor(targets), 0.25, 2.0, reduction="none")
    ref = ref.mean(dim=(-2, -1)).numpy()
    got = losses.sigmoid_focal_loss(jnp.asarray(logits), jnp.asarray(targets))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7)


def test_focal_is_stable_for_large_logits():
    logits = jnp.array([[[200.0, -200.0]]])
    targets = jnp.array([[[0.0, 1.0]]])
    out = losses.sigmoid_focal_loss(logits, targets)
    assert np.isfinite(out).all() and out[0] > 10


def test_dice_formula(data):
    logits, targets = data
    p = 1 / (1 + np.exp(-logits))
    ref = 1 - (2 * (p * targets).sum((-2, -1)) + 1) / (p.sum((-2, -1)) + targets.sum((-2, -1)) + 1)
    got = losses.dice_loss(jnp.asarray(logits), jnp.asarray(targets))
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    perfect = losses.dice_loss(jnp.asarray(targets * 40 - 20), jnp.asarray(targets))
    assert float(perfect.max()) < 1e-3


def test_min_loss_rule_picks_and_backpropagates_only_the_best_output():
    rng = np.random.default_rng(1)
    gt = (rng.uniform(size=(8, 8)) < 0.5).astype(np.float32)
    good = gt * 8 - 4
    logits = np.stack([rng.normal(0, 1, (8, 8)), good, rng.normal(0, 1, (8, 8))]).astype(np.float32)
    iou_pred = jnp.array([0.3, 0.9, 0.1])

    def f(lg):
        return losses.sam_round_loss(lg, iou_pred, jnp.asarray(gt))

    out = f(jnp.asarray(logits))
    assert int(out["best"]) == 1
    focal = losses.sigmoid_focal_loss(jnp.asarray(good), jnp.asarray(gt))
    dice = losses.dice_loss(jnp.asarray(good), jnp.asarray(gt))
    actual = np.array([float(mask_iou(x > 0, gt > 0)) for x in logits])
    iou_mse = np.mean((np.asarray(iou_pred) - actual) ** 2)  # supervise_all_iou: mean over 3
    np.testing.assert_allclose(out["loss"], 20 * focal + dice + iou_mse, rtol=1e-5)
    grads = jax.grad(lambda lg: f(lg)["loss"])(jnp.asarray(logits))
    assert float(jnp.abs(grads[1]).sum()) > 0
    assert float(jnp.abs(grads[0]).sum()) == 0 and float(jnp.abs(grads[2]).sum()) == 0


def test_iou_supervision_on_chosen_output_only():
    gt = jnp.ones((4, 4))
    logits = jnp.stack([-jnp.ones((4, 4)), jnp.ones((4, 4)) * 5, -jnp.ones((4, 4))])
    iou_pred = jnp.array([0.5, 0.5, 0.5])
    chosen = losses.sam_round_loss(logits, iou_pred, gt, supervise_all_iou=False)
    every = losses.sam_round_loss(logits, iou_pred, gt, supervise_all_iou=True)
    assert float(chosen["iou_mse"]) == pytest.approx(0.25)  # (0.5 - 1)^2
    assert float(every["iou_mse"]) == pytest.approx((0.25 + 0.25 + 0.25) / 3)


def test_masked_mean():
    x = jnp.array([[1.0, 2.0], [3.0, 100.0]])
    valid = jnp.array([[True, True], [True, False]])
    assert float(losses.masked_mean(x, valid)) == pytest.approx(2.0)
    assert float(losses.masked_mean(x, jnp.zeros_like(valid))) == 0.0


def test_cross_entropy_mode_has_finite_gradients_when_saturated():
    logits = jnp.array([[[40.0, -40.0], [0.5, -0.5]]])
    targets = jnp.array([[[1.0, 0.0], [1.0, 0.0]]])
    bce = losses.sigmoid_focal_loss(logits, targets, alpha=-1.0, gamma=0.0)
    ref = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.tensor(np.asarray(logits)), torch.tensor(np.asarray(targets)), reduction="none"
    ).mean(dim=(-2, -1))
    np.testing.assert_allclose(bce, ref.numpy(), rtol=1e-6)
    for gamma in (0.0, 2.0):
        g = jax.grad(lambda x, gm=gamma: losses.sigmoid_focal_loss(x, targets, -1.0, gm).sum())(
            logits
        )
        assert np.isfinite(np.asarray(g)).all()
