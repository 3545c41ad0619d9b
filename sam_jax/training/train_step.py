"""The SAM train step: encoder once per image, then the 11-round interactive simulation.

Batch (global, sharded over the batch axes), as produced by `sam_jax.data.make_train_iterator`:
    image (B, S, S, 3) uint8, resized longest side S and zero-padded bottom/right
    image_hw (B, 2) int32 resized (h, w) before padding
    masks (B, M, m, m) uint8 ground truth at the low-res size m = 4g, in the padded frame
    mask_valid (B, M) bool
Every mask is one prompt sequence: the decoder sees (B, M) prompts per step and round.

Rounds (paper appendix A): round 0 is a uniform foreground point or a noisy box (equal chance);
rounds 1..R-1 add one click drawn uniformly from the error region (positive in a false negative,
negative in a false positive), except in the last round and one random correction round, and feed
the previous round's logits back as the mask prompt (always in a round without a click, with
probability train.mask_prompt_prob in the others; 1 in the paper). A prompt of a single point
uses the 3-output head with the minimum-loss rule; any other prompt (a box, several
points) uses the single output (SAM 2's rule, a box counting as two points). The fed-back mask is
the most confident output (highest predicted IoU). Fed-back logits and sampled points carry no
gradient; the losses of all rounds are summed; per-mask losses are averaged over valid masks.

Text prompts (D.5): a batch carrying `text_embedding` (B, M, E), the CLIP image embeddings of
each mask's region (`sam_jax.training.text_prompts`), makes the first prompt of a mask of at
least train.text_min_area input pixels that text token instead, with probability
train.text_prob (a text alone counts as one prompt: 3 outputs); correction clicks follow.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from sam_jax import functional as F
from sam_jax.config import PIXEL_MEAN, PIXEL_STD
from sam_jax.modeling import lora
from sam_jax.training import losses, prompt_sampling
from sam_jax.training.optimizer import trainable_labels
from sam_jax.training.train_state import TrainState


def num_click_slots(num_rounds: int) -> int:
    """Click slots needed: the first point plus one per correction round that adds a point."""
    return 1 + max(num_rounds - 3, 0) + (1 if num_rounds == 2 else 0)


def normalize_images(image: jax.Array, image_hw: jax.Array) -> jax.Array:
    """uint8 (B, S, S, 3) -> float32 normalised, zero outside the (h, w) image (as official)."""
    x = (image.astype(jnp.float32) - jnp.asarray(PIXEL_MEAN)) / jnp.asarray(PIXEL_STD)
    s = image.shape[1]
    rows = jnp.arange(s)[None, :, None] < image_hw[:, 0, None, None]
    cols = jnp.arange(s)[None, None, :] < image_hw[:, 1, None, None]
    return jnp.where((rows & cols)[..., None], x, 0.0)


def valid_masks(batch: dict[str, jax.Array], image_size: int, max_area_fraction: float):
    """mask_valid & non-empty & covering at most max_area_fraction of the (unpadded) image."""
    masks = batch["masks"] > 0
    m = masks.shape[-1]
    area = masks.sum(axis=(-2, -1)).astype(jnp.float32)
    cell = (image_size / m) ** 2
    image_area = (batch["image_hw"][:, 0] * batch["image_hw"][:, 1]).astype(jnp.float32) / cell
    return batch["mask_valid"] & (area > 0) & (area <= max_area_fraction * image_area[:, None])


def _select(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x (B, M, C, ...), idx (B, M) -> (B, M, ...)."""
    idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=2)[:, :, 0]


def decode_all_outputs(
    model, params, emb, points, labels, mask_input, has_mask, lora=None, lora_key=None,
    text=None, has_text=None,
):  # fmt: skip
    """All four decoder outputs in one pass: logits (B, P, 4, m, m) and IoU (B, P, 4), float32.

    Output 0 is what `decode(multimask_output=False)` returns, outputs 1..3 what
    `decode(multimask_output=True)` returns (`multimask_output=None`), so one decoder pass serves
    both the single-point and the multi-prompt rule. lora: the `lora` variable collection
    (`lora.lora_variables`) or None; lora_key: the key of LoRA dropout (None: no dropout).
    """
    if not lora:
        return F.decode_prompts(
            model, params, emb, points, labels, mask_input, has_mask, None, text, has_text
        )
    rngs = {} if lora_key is None else {"lora_dropout": lora_key}
    return model.apply(
        {"params": params, "lora": lora},
        emb,
        points,
        labels,
        mask_input,
        has_mask,
        None,
        text,
        has_text,
        rngs=rngs,
        method=model.decode,
    )


def mask_prompt_rounds(key: jax.Array, add: jax.Array, prob: float) -> jax.Array:
    """Which rounds get the previous logits as mask prompt: (R, ...) bool from `add` (R, ...).

    None in round 0; in a correction round with a click, with probability `prob` (1 in the
    paper); always in a round without a new click, which exists to refine the previous mask.
    """
    has_mask = jax.random.bernoulli(key, prob, add.shape) | ~add
    return has_mask.at[0].set(False)


def simulate_and_loss(
    model: Any,
    params: Any,
    emb: jax.Array,
    batch: dict[str, jax.Array],
    key: jax.Array,
    tc: Any,
    lora: Any = None,
    lora_dropout: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Runs the interactive rounds on image embeddings (B, g, g, D); returns (loss, metrics).

    tc: the `config.train` ConfigDict (num_rounds, loss weights, box noise, ...). All rounds
    share one `lax.scan` body (one decoder pass per round, compiled once). lora: the decoder's
    LoRA variables or None; lora_dropout: draw LoRA dropout masks (training).
    """
    image_size = model.config.image_size
    gt = batch["masks"] > 0
    b, n_masks, m, _ = gt.shape
    valid = valid_masks(batch, image_size, tc.max_mask_area_fraction)
    loss_kw = dict(
        focal_weight=tc.focal_weight,
        dice_weight=tc.dice_weight,
        iou_weight=tc.iou_weight,
        supervise_all_iou=tc.supervise_all_iou,
        focal_alpha=tc.focal_alpha,
        focal_gamma=tc.focal_gamma,
    )
    k_init, k_sched, k_rounds, k_mask = jax.random.split(key, 4)
    k_text = jax.random.fold_in(key, 5)
    prompts = prompt_sampling.initial_prompts(
        k_init,
        gt,
        batch["image_hw"],
        image_size,
        num_click_slots(tc.num_rounds),
        tc.box_prob,
        tc.box_noise_std,
        tc.box_noise_max,
    )
    text, use_text = batch.get("text_embedding"), None
    if text is not None:  # D.5: the region's CLIP embedding first, for large enough masks
        cell = (image_size / m) ** 2
        large = gt.sum(axis=(-2, -1)) * cell >= tc.text_min_area
        use_text = large & jax.random.bernoulli(k_text, tc.text_prob, (b, n_masks))
        prompts = prompt_sampling.text_first(prompts, use_text)
    # Round 0 adds no click; rounds 1.. follow the paper's schedule.
    add = jnp.concatenate(
        [
            jnp.zeros((1, b, n_masks), bool),
            prompt_sampling.point_round_schedule(k_sched, (b, n_masks), tc.num_rounds),
        ]
    )

    def one_round(carry, xs):
        prompts, prev = carry
        k, add_r, has_mask = xs
        prompts = prompt_sampling.add_correction_click(k, prompts, prev > 0, gt, image_size, add_r)
        prompts = jax.lax.stop_gradient(prompts)
        drop_key = jax.random.fold_in(k, 1) if lora_dropout else None
        logits, iou = decode_all_outputs(
            model, params, emb, prompts["points"], prompts["labels"], prev, has_mask, lora,
            drop_key, text, use_text,
        )  # fmt: skip
        # One point or a text alone (no box): 3 outputs, back-propagate the min-loss one;
        # otherwise output 0.
        sparse = prompts["num_clicks"] + (0 if use_text is None else use_text.astype(jnp.int32))
        multi = (sparse == 1) & ~prompts["is_box"]
        l3 = losses.sam_round_loss(logits[:, :, 1:], iou[:, :, 1:], gt, **loss_kw)
        l1 = losses.sam_round_loss(logits[:, :, :1], iou[:, :, :1], gt, **loss_kw)
        out = jax.tree.map(lambda a, c: jnp.where(multi, a, c), l3, l1)
        # Feed back the most confident output (unthresholded logits), without gradient.
        confident = _select(logits[:, :, 1:], jnp.argmax(iou[:, :, 1:], axis=-1))
        fed = jnp.where(multi[..., None, None], confident, logits[:, :, 0])
        return (prompts, jax.lax.stop_gradient(fed)), out

    has_mask = mask_prompt_rounds(k_mask, add, tc.mask_prompt_prob)
    init = (prompts, jnp.zeros((b, n_masks, m, m), jnp.float32))
    keys = jax.random.split(k_rounds, tc.num_rounds)
    xs = (keys, add, has_mask)
    # remat_rounds: the backward pass recomputes each round's decoder pass instead of keeping
    # its activations (per prompt a copy of the image embedding through the two-way transformer:
    # with 16 masks at 1024 px, 11 rounds held ~40 GB), so memory is one round's.
    body = jax.checkpoint(one_round) if tc.remat_rounds else one_round
    _, per_round = jax.lax.scan(body, init, xs, unroll=tc.unroll_rounds)  # leaves (R, B, M)

    rmean = jax.vmap(functools.partial(losses.masked_mean, valid=valid))
    metrics = {k: rmean(per_round[k]).sum() for k in ("loss", "focal", "dice", "iou_mse")}
    ious = rmean(per_round["iou"])
    metrics["iou_first_round"] = ious[0]
    metrics["iou_last_round"] = ious[-1]
    metrics["num_valid_masks"] = valid.sum()
    if use_text is not None:
        metrics["iou_first_round_text"] = losses.masked_mean(per_round["iou"][0], valid & use_text)
        metrics["text_prompt_fraction"] = (valid & use_text).sum() / jnp.maximum(valid.sum(), 1)
    return metrics["loss"], metrics


def uses_cached_embeddings(batch: dict[str, Any]) -> bool:
    """A batch from the embedding cache carries `embedding` (B, g, g, D) instead of `image`."""
    return "embedding" in batch


def make_train_step(
    model: Any,
    tx: optax.GradientTransformation,
    config: Any,
    params_template: Any,
    mesh: Any = None,
):
    """Returns train_step(state, batch) -> (state, metrics) (to be jitted by the caller).

    mesh: the device mesh the batch is split over (sam_jax.training.sharding); when given, the
    step is traced with it as the abstract mesh (per-device kernels run over it).

    With LoRA (`config.lora.rank > 0`) the adapters in `state.adapters` are applied to their
    layers without merging (y = x W + (alpha/r) (dropout(x) a) b) and trained with whatever
    `config.trainable` names. A batch carrying `embedding` (the embedding cache,
    sam_jax.training.embedding_cache) skips the frozen encoder. A step with a non-finite loss or
    gradient leaves the state unchanged (the loop then stops).
    """
    tc = config.train
    labels = trainable_labels(params_template, config.trainable)
    encoder_trains = any(lab == "train" for lab in jax.tree.leaves(labels["image_encoder"]))
    lc = config.lora
    scale = lora.scale_of(lc) if lc.rank > 0 else 0.0
    dropout = float(lc.dropout) if lc.rank > 0 else 0.0

    def loss_fn(trainables, batch, key):
        # Frozen parts are constants: no gradient is computed for them.
        params = jax.tree.map(
            lambda p, lab: p if lab == "train" else jax.lax.stop_gradient(p),
            trainables["params"],
            labels,
        )
        adapters = trainables["adapters"]
        lora_vars = lora.lora_variables(adapters, scale, dropout) if adapters else None
        enc_lora = (lora_vars or {}).get("image_encoder")
        dec_lora = (lora_vars or {}).get("mask_decoder")
        k_drop, k_sim = jax.random.split(key)
        if uses_cached_embeddings(batch):
            emb = batch["embedding"]
        else:
            images = normalize_images(batch["image"], batch["image_hw"])
            variables = {"params": params}
            if enc_lora:
                variables["lora"] = {"image_encoder": enc_lora}
            emb = model.apply(
                variables,
                images,
                deterministic=not (encoder_trains or enc_lora),
                rngs={"dropout": k_drop, "lora_dropout": jax.random.fold_in(k_drop, 1)},
                method=model.encode,
            )
        dec = {"mask_decoder": dec_lora} if dec_lora else None
        return simulate_and_loss(model, params, emb, batch, k_sim, tc, dec, dropout > 0)

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        if mesh is None:
            return _train_step(state, batch)
        # The mesh is known while tracing: per-device kernels (the encoder's Pallas attention)
        # run over it with shard_map.
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return _train_step(state, batch)

    def _train_step(state: TrainState, batch: dict[str, jax.Array]):
        key = jax.random.fold_in(state.key(), state.step)
        trainables = state.trainables
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainables, batch, key)
        updates, opt_state = tx.update(grads, state.opt_state, trainables)
        new = optax.apply_updates(trainables, updates)
        # Frozen params are passed on as they are (bit-identical, not p + 0).
        frozen = lambda n, o, lab: n if lab == "train" else o
        new["params"] = jax.tree.map(frozen, new["params"], state.params, labels)
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(new))
        keep = lambda new, old: jax.tree.map(lambda a, c: jnp.where(ok, a, c), new, old)
        new_state = state.replace(
            step=state.step + 1,
            params=keep(new["params"], state.params),
            adapters=keep(new["adapters"], state.adapters),
            opt_state=keep(opt_state, state.opt_state),
        )
        metrics = {**metrics, "loss": loss, "grad_norm": grad_norm, "finite": ok}
        return new_state, metrics

    return train_step
