"""Model config and initial parameters for training: random, a SAM checkpoint, or MAE.

- "random": `model.init_params(key)`.
- "sam": a converted sam_jax checkpoint directory or an official SAM .pth (`sam_jax.checkpoints`);
  the architecture comes from the checkpoint (config.model is ignored, model_overrides such as
  drop_path_rate still apply; a text path added by model_overrides.text_embed_dim starts with a
  random projection, `with_text_projection`).
- "mae": an official MAE pre-training or fine-tuning .pth (facebookresearch/mae layout, `model`
  key holding `patch_embed.proj.*`, `pos_embed` (1, 1 + n*n, C) with a cls slot, `blocks.i.{norm1,
  attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}.*`). The ViT blocks and patch embedding are copied
  into the SAM image encoder (fc1/fc2 -> mlp.lin1/lin2); the position embedding drops the cls slot
  and is resized bicubically to the g x g grid, and a patch kernel of another size (MAE ViT-H/14)
  is resized to SAM's patch size as in ViTDet. Everything else (rel-pos, neck, prompt encoder,
  decoder) keeps its random init. cls_token, the final norm, heads and MAE decoder are ignored.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from sam_jax.checkpoints import read_state_dict
from sam_jax.checkpoints.load import read_checkpoint, read_config
from sam_jax.checkpoints.mapping import expected_leaves, flatten_params, to_flax_layout
from sam_jax.config import SamConfig, get_config, tiny_config


def sam_config_from(config: Any) -> SamConfig:
    """The SamConfig of an experiment config (model name + model_overrides, or the init ckpt)."""
    overrides = dict(config.model_overrides)
    if config.init.type == "sam":
        if not config.init.path:
            raise ValueError("init.type='sam' needs init.path")
        return read_config(config.init.path).replace(**overrides)
    if config.model == "tiny":
        return tiny_config(**overrides)
    return get_config(config.model, **overrides)


def _resize(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if x.shape == tuple(shape):
        return x
    return np.asarray(jax.image.resize(jnp.asarray(x), shape, method="bicubic"), np.float32)


_MAE_BLOCK = re.compile(r"blocks\.(\d+)\.(norm1|attn\.qkv|attn\.proj|norm2|mlp\.fc1|mlp\.fc2)\.")


def mae_to_sam_state_dict(sd: dict[str, np.ndarray], config: SamConfig) -> dict[str, np.ndarray]:
    """Official MAE state_dict -> the SAM image-encoder keys it provides (torch layout)."""
    out: dict[str, np.ndarray] = {}
    e, g, p = config.encoder_embed_dim, config.embedding_size, config.patch_size
    if "pos_embed" not in sd or "patch_embed.proj.weight" not in sd:
        raise ValueError("not an MAE ViT checkpoint: no pos_embed / patch_embed.proj.weight")
    pos = sd["pos_embed"]
    n = pos.shape[1]
    side = int(round(np.sqrt(n - 1)))
    if side * side == n - 1:
        pos = pos[:, 1:]  # drop the cls token slot
    else:
        side = int(round(np.sqrt(n)))
    if pos.shape[-1] != e:
        raise ValueError(f"MAE width {pos.shape[-1]} does not match encoder_embed_dim {e}")
    out["image_encoder.pos_embed"] = _resize(pos.reshape(1, side, side, e), (1, g, g, e))
    w = sd["patch_embed.proj.weight"]
    out["image_encoder.patch_embed.proj.weight"] = _resize(w, (w.shape[0], w.shape[1], p, p))
    out["image_encoder.patch_embed.proj.bias"] = sd["patch_embed.proj.bias"]
    depth = 0
    for k, v in sd.items():
        m = _MAE_BLOCK.match(k)
        if not m:
            continue
        depth = max(depth, int(m.group(1)) + 1)
        name = k.replace("mlp.fc1", "mlp.lin1").replace("mlp.fc2", "mlp.lin2")
        out["image_encoder." + name] = v
    if depth != config.encoder_depth:
        raise ValueError(f"MAE checkpoint has {depth} blocks, the config {config.encoder_depth}")
    return out


def load_mae_params(path: str, config: SamConfig, params: Any) -> Any:
    """Copies an MAE checkpoint's encoder weights into `params` (numpy tree); returns a new tree."""

    sub = mae_to_sam_state_dict(read_state_dict(path), config)
    leaves = expected_leaves(config)
    flat = {k: np.asarray(v) for k, v in flatten_params(params).items()}
    for key, value in sub.items():
        leaf = leaves[key]
        value = to_flax_layout(np.asarray(value, np.float32), leaf.layout)
        if value.shape != leaf.flax_shape:
            raise ValueError(f"MAE {key} has shape {value.shape}, SAM expects {leaf.flax_shape}")
        flat[leaf.flax_path] = value
    return traverse_util.unflatten_dict(flat)


def with_text_projection(params: Any, sam_config: SamConfig, seed: int) -> Any:
    """A SAM checkpoint without a text path trained with one (model_overrides.text_embed_dim):
    the prompt encoder's text projection starts as `nn.Dense` would (LeCun-normal kernel, zero
    bias); everything else is the checkpoint's."""
    pe = params["prompt_encoder"]
    if not sam_config.text_embed_dim or "text_projection" in pe:
        return params
    e, d = sam_config.text_embed_dim, sam_config.prompt_embed_dim
    key = jax.random.fold_in(jax.random.key(seed), 0x7E47)
    kernel = np.asarray(jax.nn.initializers.lecun_normal()(key, (e, d)), np.float32)
    projection = {"kernel": kernel, "bias": np.zeros((d,), np.float32)}
    return {**params, "prompt_encoder": {**pe, "text_projection": projection}}


def initial_params(config: Any, sam_config: SamConfig, model: Any) -> Any | None:
    """Host (numpy) params for init.type 'sam' / 'mae'; None for 'random' (init on device)."""
    kind = config.init.type
    if kind == "random":
        return None
    if kind == "sam":
        # a converted directory, a .pth, a transformers folder, a registry name or a hub id
        _, params = read_checkpoint(config.init.path)
        return with_text_projection(params, sam_config, config.seed)
    if kind == "mae":
        if not config.init.path:
            raise ValueError("init.type='mae' needs init.path")
        params = jax.device_get(model.init_params(jax.random.key(config.seed)))
        return load_mae_params(config.init.path, sam_config, params)
    raise ValueError(f"init.type must be 'random', 'sam' or 'mae', got {kind!r}")
