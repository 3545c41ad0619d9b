"""AdamW with warm-up + step (or cosine) decay, layer-wise lr decay, clipping and frozen parts.

Layer-wise learning-rate decay follows ViTDet (detectron2 `get_vit_lr_decay_rate`), which SAM's
MAE-initialised encoder training uses: with `L = encoder_depth`,
    layer 0      image_encoder/patch_embed/*, image_encoder/pos_embed
    layer i + 1  image_encoder/blocks_i/*
    layer L + 1  everything else (image_encoder/neck_*, prompt_encoder, mask_decoder)
and a parameter of layer `l` gets `lr * layer_decay ** (L + 1 - l)` (weight decay scales with it,
as in a detectron2 param group). Weight decay applies to every parameter with ndim >= 2 except
position embeddings and embedding tables (MAE's rule: no decay on biases, norms, pos_embed).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_jax.params import param_path

TRAINABLE_CHOICES = ("all", "prompt_encoder_and_decoder", "mask_decoder", "none")
# Buffers in the official model (never trained): the random Fourier features of the prompt PE,
# and the running statistics of TinyViT's BatchNorms (params leaves, BN_STATISTICS).
ALWAYS_FROZEN = re.compile(r"positional_encoding_gaussian_matrix|/(running_mean|running_var)$")
_NO_DECAY = re.compile(r"(pos_embed|embedding|positional_encoding_gaussian_matrix)$")


def layer_id(path: str, num_layers: int) -> int:
    """ViTDet layer id of a parameter path (see module doc)."""
    if path.startswith("image_encoder/"):
        rest = path[len("image_encoder/") :]
        if rest.startswith(("patch_embed", "pos_embed")):
            return 0
        m = re.match(r"blocks_(\d+)/", rest)
        if m:
            return int(m.group(1)) + 1
    return num_layers + 1


def layer_lr_scales(params: Any, num_layers: int, layer_decay: float) -> Any:
    """Tree of per-parameter lr multipliers `layer_decay ** (num_layers + 1 - layer_id)`."""
    return jax.tree_util.tree_map_with_path(
        lambda p, _: float(layer_decay ** (num_layers + 1 - layer_id(param_path(p), num_layers))),
        params,
    )


def trainable_labels(params: Any, trainable: str) -> Any:
    """Tree of 'train' / 'freeze' labels for `trainable` in TRAINABLE_CHOICES."""
    if trainable not in TRAINABLE_CHOICES:
        raise ValueError(f"trainable must be one of {TRAINABLE_CHOICES}, got {trainable!r}")
    prefixes = {
        "all": ("",),
        "prompt_encoder_and_decoder": ("prompt_encoder/", "mask_decoder/"),
        "mask_decoder": ("mask_decoder/",),
        "none": (),  # only LoRA adapters train
    }[trainable]

    def label(path, _):
        s = param_path(path)
        train = bool(prefixes) and s.startswith(prefixes) and not ALWAYS_FROZEN.search(s)
        return "train" if train else "freeze"

    return jax.tree_util.tree_map_with_path(label, params)


def weight_decay_mask(params: Any) -> Any:
    """True for parameters that get weight decay (ndim >= 2, not a position/embedding table)."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: bool(x.ndim >= 2 and not _NO_DECAY.search(param_path(p))), params
    )


def make_lr_schedule(
    base_lr: float,
    total_steps: int,
    warmup_steps: int = 0,
    decay: str = "step",
    decay_steps: Sequence[int] = (),
    decay_factor: float = 0.1,
) -> Callable[[jax.Array], jax.Array]:
    """Linear warm-up to base_lr over warmup_steps, then
    'step': multiply by decay_factor at each of decay_steps (SAM: /10 at 60k and 86,666 of 90k);
    'cosine': cosine decay to 0 at total_steps; 'constant': no decay."""
    if decay not in ("step", "cosine", "constant"):
        raise ValueError(f"lr decay must be 'step', 'cosine' or 'constant', got {decay!r}")
    bounds = jnp.asarray(sorted(decay_steps) or [total_steps + 1], jnp.int32)

    def schedule(step):
        step = jnp.asarray(step)
        warm = jnp.minimum(1.0, (step + 1) / max(warmup_steps, 1))
        if decay == "step":
            factor = decay_factor ** jnp.sum(step >= bounds)
        elif decay == "cosine":
            t = jnp.clip((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0, 1.0)
            factor = 0.5 * (1 + jnp.cos(jnp.pi * t))
        else:
            factor = 1.0
        return base_lr * warm * factor

    return schedule


class ScaleByTreeState(NamedTuple):
    pass


def scale_by_tree(scales: Any) -> optax.GradientTransformation:
    """Multiplies each update by a fixed per-leaf float (layer-wise lr decay)."""

    def init_fn(params):
        del params
        return ScaleByTreeState()

    def update_fn(updates, state, params=None):
        del params

        # Under optax.multi_transform, leaves of other groups arrive as MaskedNode: pass them on.
        def scale(u, s):
            return u if isinstance(u, optax.MaskedNode) else u * jnp.asarray(s, u.dtype)

        masked = lambda x: isinstance(x, optax.MaskedNode)
        return jax.tree.map(scale, updates, scales, is_leaf=masked), state

    return optax.GradientTransformation(init_fn, update_fn)


def lr_schedule_from_config(config: Any) -> Callable[[jax.Array], jax.Array]:
    """make_lr_schedule from the `optimizer` fields of an experiment config."""
    oc = config.optimizer
    return make_lr_schedule(
        oc.lr, config.total_steps, oc.warmup_steps, oc.decay, tuple(oc.decay_steps), oc.decay_factor
    )


def make_optimizer(
    config: Any, params: Any, num_layers: int, adapters: Any = None
) -> optax.GradientTransformation:
    """The training optimizer from an experiment config (see sam_jax.training.defaults), over
    the tree {"params": params, "adapters": LoRA adapters ({} without LoRA)}. Frozen params get
    no optimizer state; adapters always train, with the layer-wise lr of the layer they adapt."""
    oc = config.optimizer
    schedule = lr_schedule_from_config(config)
    trees = {"params": params, "adapters": {} if adapters is None else adapters}
    parts = []
    if oc.grad_clip_norm and oc.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(oc.grad_clip_norm))
    decay_mask = {k: weight_decay_mask(t) for k, t in trees.items()}
    parts += [
        optax.scale_by_adam(b1=oc.b1, b2=oc.b2, eps=oc.eps),
        optax.add_decayed_weights(oc.weight_decay, mask=decay_mask),
        optax.scale_by_learning_rate(schedule),
    ]
    if oc.layer_decay != 1.0:
        scales = {k: layer_lr_scales(t, num_layers, oc.layer_decay) for k, t in trees.items()}
        parts.append(scale_by_tree(scales))
    labels = {
        "params": trainable_labels(params, config.trainable),
        "adapters": jax.tree.map(lambda _: "train", trees["adapters"]),
    }
    return optax.multi_transform(
        {"train": optax.chain(*parts), "freeze": optax.set_to_zero()}, labels
    )
