"""SAM training losses: focal + dice on mask logits, MSE on the IoU head.

Normalisation follows SAM 2's `training/loss_fns.py`: the focal loss is averaged over the pixels
of each mask, the dice loss is `1 - (2 |p t| + 1) / (|p| + |t| + 1)` per mask, and per-mask losses
are averaged over the valid masks of the (global) batch by the caller.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sam_jax.evaluation.metrics import mask_iou


def sigmoid_focal_loss(
    logits: jax.Array, targets: jax.Array, alpha: float = 0.25, gamma: float = 2.0
) -> jax.Array:
    """Focal loss of each mask, averaged over its pixels.

    logits, targets: (..., H, W) (targets in {0, 1}). Returns (...,) float32. alpha < 0 disables
    the class weighting; alpha < 0 and gamma = 0 give binary cross-entropy.
    """
    logits = logits.astype(jnp.float32)
    targets = targets.astype(jnp.float32)
    prob = jax.nn.sigmoid(logits)
    # Stable binary cross-entropy with logits.
    ce = jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    p_t = prob * targets + (1 - prob) * (1 - targets)
    # gamma == 0 (plain cross-entropy): skip the factor, whose gradient is NaN at p_t == 1.
    loss = ce * (1 - p_t) ** gamma if gamma else ce
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.mean(axis=(-2, -1))


def dice_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Dice loss of each mask: (..., H, W) -> (...,) float32."""
    prob = jax.nn.sigmoid(logits.astype(jnp.float32))
    targets = targets.astype(jnp.float32)
    numerator = 2 * (prob * targets).sum(axis=(-2, -1))
    denominator = prob.sum(axis=(-2, -1)) + targets.sum(axis=(-2, -1))
    return 1 - (numerator + 1) / (denominator + 1)


def sam_round_loss(
    logits: jax.Array,
    iou_pred: jax.Array,
    targets: jax.Array,
    *,
    focal_weight: float = 20.0,
    dice_weight: float = 1.0,
    iou_weight: float = 1.0,
    supervise_all_iou: bool = True,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
) -> dict[str, jax.Array]:
    """Per-mask loss of one decoder round.

    logits: (..., C, H, W) mask logits for C outputs (C = 1 or 3); iou_pred: (..., C);
    targets: (..., H, W) ground truth. With C > 1 only the output with the lowest
    `focal_weight * focal + dice_weight * dice` is back-propagated (SAM's minimum-loss rule); the
    IoU head is supervised on all C outputs (mean, SAM 2's `supervise_all_iou`) or only on the
    chosen one. Returns a dict of (...,) arrays: "loss" (weighted total), "focal", "dice",
    "iou_mse", the chosen output index "best" and its actual "iou" with the target.
    """
    t = targets[..., None, :, :]
    focal = sigmoid_focal_loss(logits, t, focal_alpha, focal_gamma)  # (..., C)
    dice = dice_loss(logits, t)
    actual_iou = jax.lax.stop_gradient(mask_iou(logits > 0, t > 0))  # of the binarised masks
    iou_mse = (iou_pred.astype(jnp.float32) - actual_iou) ** 2
    combo = focal_weight * focal + dice_weight * dice
    best = jnp.argmin(jax.lax.stop_gradient(combo), axis=-1)

    def pick(x):
        return jnp.take_along_axis(x, best[..., None], axis=-1)[..., 0]

    focal, dice, iou_best = pick(focal), pick(dice), pick(actual_iou)
    iou_mse = iou_mse.mean(axis=-1) if supervise_all_iou else pick(iou_mse)
    loss = focal_weight * focal + dice_weight * dice + iou_weight * iou_mse
    return {
        "loss": loss,
        "focal": focal,
        "dice": dice,
        "iou_mse": iou_mse,
        "best": best,
        "iou": iou_best,
    }


def masked_mean(x: jax.Array, valid: jax.Array) -> jax.Array:
    """Mean of x over the entries where valid is True (0 when none is)."""
    valid = valid.astype(jnp.float32)
    return jnp.sum(x * valid) / jnp.maximum(jnp.sum(valid), 1.0)
