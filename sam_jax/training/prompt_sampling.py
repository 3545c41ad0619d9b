"""Interactive prompt simulation for SAM training (paper appendix A), on device with jax.random.

Masks live at the low-res size m x m (the decoder's output size, m = 4g) inside the padded model
input frame of size S x S, so one mask cell covers s = S / m input pixels. A point sampled in cell
(row, col) gets the input-frame coordinates

    x = (col + u) * s - 0.5,   y = (row + v) * s - 0.5,   u, v ~ U[0, 1)

The model adds the official +0.5 pixel-centre shift, so the continuous position it encodes,
(col + u) * s, is uniform inside that cell: a point sampled in a cell lands inside it.

Prompt layout (N = K + 3 slots per mask, fixed so that all rounds share one shape):
    slots 0..K-1   clicks (label 1 / 0), unused slots PAD_LABEL
    slot  K        the official padding point (label -1) when there is no box, else PAD_LABEL
    slots K+1, K+2 box corners (labels 2, 3) when the first prompt is a box, else PAD_LABEL
PAD_LABEL slots are masked out of attention, so this equals the official token sequences.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

PAD_LABEL = -10  # Same value as sam_jax.modeling.PAD_LABEL (kept here to avoid a model import).


def sample_uniform_cell(key: jax.Array, region: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Draws one cell uniformly from each boolean region.

    region: (..., m, m) bool. Returns (index (...,) int32 flat row-major cell index, found (...,)
    bool: False when the region is empty, the index is then 0).
    """
    flat = region.reshape(*region.shape[:-2], -1)
    noise = jax.random.uniform(key, flat.shape)
    idx = jnp.argmax(jnp.where(flat, noise, -1.0), axis=-1).astype(jnp.int32)
    return idx, flat.any(axis=-1)


def cell_to_coords(key: jax.Array, idx: jax.Array, m: int, image_size: int) -> jax.Array:
    """Flat cell index (...,) at m x m -> (..., 2) (x, y) in the S x S input frame (module doc)."""
    s = image_size / m
    row, col = idx // m, idx % m
    uv = jax.random.uniform(key, (*idx.shape, 2))
    return jnp.stack([(col + uv[..., 0]) * s - 0.5, (row + uv[..., 1]) * s - 0.5], axis=-1)


def mask_boxes(masks: jax.Array, image_size: int) -> jax.Array:
    """Tight XYXY boxes of (..., m, m) masks, in input-frame pixel indices: (..., 4) float32.

    The box spans the input pixels covered by the mask's cells: x0 = col_min * s,
    x1 = (col_max + 1) * s - 1. Empty masks give a meaningless box (callers mask them out).
    """
    m = masks.shape[-1]
    s = image_size / m
    ar = jnp.arange(m)
    rows, cols = masks.any(axis=-1), masks.any(axis=-2)

    def lo_hi(v):
        lo = jnp.min(jnp.where(v, ar, m), axis=-1)
        hi = jnp.max(jnp.where(v, ar, -1), axis=-1)
        return lo * s, (hi + 1) * s - 1

    x0, x1 = lo_hi(cols)
    y0, y1 = lo_hi(rows)
    return jnp.stack([x0, y0, x1, y1], axis=-1).astype(jnp.float32)


def noisy_boxes(
    key: jax.Array,
    boxes: jax.Array,
    image_hw: jax.Array,
    std_fraction: float = 0.1,
    max_noise: float = 20.0,
) -> jax.Array:
    """Adds Gaussian noise to each corner (std = std_fraction x box side, at most max_noise px).

    boxes (..., 4) XYXY; image_hw (..., 2) broadcastable (h, w) of the unpadded image, used to
    clip. Corners are re-ordered so that x0 <= x1 and y0 <= y1.
    """
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    std = jnp.minimum(std_fraction * jnp.stack([w, h, w, h], axis=-1), max_noise)
    b = boxes + std * jax.random.normal(key, boxes.shape)
    hw = image_hw.astype(jnp.float32)
    hi = jnp.stack([hw[..., 1], hw[..., 0], hw[..., 1], hw[..., 0]], axis=-1) - 1
    b = jnp.clip(b, 0, hi)
    return jnp.stack(
        [
            jnp.minimum(b[..., 0], b[..., 2]),
            jnp.minimum(b[..., 1], b[..., 3]),
            jnp.maximum(b[..., 0], b[..., 2]),
            jnp.maximum(b[..., 1], b[..., 3]),
        ],
        axis=-1,
    )


def initial_prompts(
    key: jax.Array,
    masks: jax.Array,
    image_hw: jax.Array,
    image_size: int,
    num_click_slots: int,
    box_prob: float = 0.5,
    box_noise_std: float = 0.1,
    box_noise_max: float = 20.0,
) -> dict[str, jax.Array]:
    """First prompt of each mask: a uniform foreground point or (with box_prob) a noisy box.

    masks: (B, M, m, m) bool; image_hw: (B, 2) int. Returns a dict with
    points (B, M, K+3, 2) float32, labels (B, M, K+3) int32, num_clicks (B, M) int32 and
    is_box (B, M) bool (K = num_click_slots; layout in the module doc).
    """
    b, n_masks, m, _ = masks.shape
    k = num_click_slots
    k_box, k_pt, k_uv, k_noise = jax.random.split(key, 4)
    is_box = jax.random.uniform(k_box, (b, n_masks)) < box_prob
    idx, _ = sample_uniform_cell(k_pt, masks)
    point = cell_to_coords(k_uv, idx, m, image_size)  # (B, M, 2)
    hw = image_hw[:, None, :]
    box = noisy_boxes(k_noise, mask_boxes(masks, image_size), hw, box_noise_std, box_noise_max)

    points = jnp.zeros((b, n_masks, k + 3, 2), jnp.float32)
    points = points.at[:, :, 0].set(point)
    points = points.at[:, :, k + 1].set(box[..., :2])
    points = points.at[:, :, k + 2].set(box[..., 2:])
    labels = jnp.full((b, n_masks, k + 3), PAD_LABEL, jnp.int32)
    labels = labels.at[:, :, 0].set(jnp.where(is_box, PAD_LABEL, 1))
    labels = labels.at[:, :, k].set(jnp.where(is_box, PAD_LABEL, -1))
    labels = labels.at[:, :, k + 1].set(jnp.where(is_box, 2, PAD_LABEL))
    labels = labels.at[:, :, k + 2].set(jnp.where(is_box, 3, PAD_LABEL))
    num_clicks = jnp.where(is_box, 0, 1).astype(jnp.int32)
    return {"points": points, "labels": labels, "num_clicks": num_clicks, "is_box": is_box}


def text_first(prompts: dict[str, jax.Array], use_text: jax.Array) -> dict[str, jax.Array]:
    """Where use_text (B, M): the first prompt is the mask's text token (SAM D.5; the decoder
    gets it apart from these slots) instead of a point or box: no click yet, no box, the
    official padding point; the correction clicks then fill the slots from 0."""
    labels = prompts["labels"]
    k = labels.shape[-1] - 3
    text_labels = jnp.full_like(labels, PAD_LABEL).at[..., k].set(-1)
    return {
        **prompts,
        "labels": jnp.where(use_text[..., None], text_labels, labels),
        "num_clicks": jnp.where(use_text, 0, prompts["num_clicks"]),
        "is_box": prompts["is_box"] & ~use_text,
    }


def add_correction_click(
    key: jax.Array,
    prompts: dict[str, jax.Array],
    pred: jax.Array,
    gt: jax.Array,
    image_size: int,
    add: jax.Array | bool = True,
) -> dict[str, jax.Array]:
    """Adds one click drawn uniformly from the error region of the current prediction.

    pred, gt: (B, M, m, m) bool. The click is positive in a false-negative cell, negative in a
    false-positive one. It goes to the next free click slot; masks with `add` False, an empty
    error region or no free slot are left unchanged. Returns the updated prompts dict.
    """
    m = gt.shape[-1]
    k_idx, k_uv = jax.random.split(key)
    error = pred != gt
    idx, found = sample_uniform_cell(k_idx, error)
    coords = cell_to_coords(k_uv, idx, m, image_size)  # (B, M, 2)
    flat_gt = gt.reshape(*gt.shape[:-2], -1)
    label = jnp.take_along_axis(flat_gt, idx[..., None], axis=-1)[..., 0].astype(jnp.int32)

    points, labels, n = prompts["points"], prompts["labels"], prompts["num_clicks"]
    k = labels.shape[-1] - 3
    write = jnp.asarray(add) & found & (n < k)
    slot = (jnp.arange(k + 3) == n[..., None]) & write[..., None]  # (B, M, K+3)
    points = jnp.where(slot[..., None], coords[..., None, :], points)
    labels = jnp.where(slot, label[..., None], labels)
    n = n + write.astype(jnp.int32)
    return {**prompts, "points": points, "labels": labels, "num_clicks": n}


def point_round_schedule(key: jax.Array, shape: tuple[int, ...], num_rounds: int) -> jax.Array:
    """Which of the correction rounds 1..num_rounds-1 add a click: (num_rounds - 1, *shape) bool.

    As in the paper, the last round and one random earlier correction round add no point; every
    other round adds one (8 clicks in the 10 correction rounds of the 11-round recipe).
    """
    n = num_rounds - 1
    if n < 2:
        return jnp.ones((max(n, 0), *shape), bool)
    skip = jax.random.randint(key, shape, 0, n - 1)  # one of rounds 1..n-1
    r = jnp.arange(n).reshape((n,) + (1,) * len(shape))
    return (r != skip) & (r != n - 1)
