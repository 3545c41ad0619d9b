"""Text prompts (SAM paper section 7.5, appendix D.5): the CLIP side of SAM's text path.

SAM is trained with the CLIP *image* embedding of the region around a mask as that mask's first
prompt; because CLIP aligns its image and text spaces, the CLIP *text* embedding of a phrase is
given instead at inference. What D.5 specifies, and where it is here:

- the region (`region_crops`): the mask's bounding box expanded by a random factor in [1, 2],
  squared around its centre (the aspect ratio kept), resized to CLIP's input size (336 px for
  ViT-L/14-336); with probability 1/2 the pixels outside the mask are zeroed;
- masked attention in CLIP's last layer: the output (class) token attends only to the patches
  inside the mask (`Clip.encode_image(region=...)`);
- embeddings are l2-normalised before use (the prompt encoder's `embed_text` does it);
- only masks of at least 100 x 100 pixels take text prompts (`min_area`, in pixels of a
  1024-px input; the training config scales it with the input size), and only as the first
  prompt, followed by the usual correction clicks.

`TextEncoder` holds a CLIP (a transformers CLIPModel folder or Hub id, e.g.
`openai/clip-vit-large-patch14-336`, the paper's) and its tokenizer: `embed_texts` for
prompts, `embed_regions` for masks of an image (what training computes, without the random
parts).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sam_jax.checkpoints.clip import ClipTokenizer, load_clip_tokenizer, load_hf_clip
from sam_jax.errors import NoTextPathError
from sam_jax.modeling.clip import CLIP_MEAN, CLIP_STD, Clip

PAPER_CLIP = "openai/clip-vit-large-patch14-336"  # ViT-L/14 at 336 px, the paper's CLIP
PAPER_MIN_AREA = 100 * 100  # D.5: masks under 100^2 pixels (at 1024 px) get no text prompt
EXPAND_RANGE = (1.0, 2.0)  # D.5: the box is expanded by a random factor in this range
ZERO_OUTSIDE_PROB = 0.5  # D.5: chance that pixels outside the mask are zeroed


def _boxes(masks: jax.Array) -> jax.Array:
    """Tight boxes (..., 4) x0, y0, x1, y1 (cell edges, exclusive max) of (..., h, w) masks."""
    h, w = masks.shape[-2:]
    rows, cols = masks.any(axis=-1), masks.any(axis=-2)

    def lo_hi(v, n):
        ar = jnp.arange(n)
        return jnp.min(jnp.where(v, ar, n), -1), jnp.max(jnp.where(v, ar, -1), -1) + 1

    x0, x1 = lo_hi(cols, w)
    y0, y1 = lo_hi(rows, h)
    return jnp.stack([x0, y0, x1, y1], -1).astype(jnp.float32)


def _crop(image: jax.Array, center: jax.Array, side: jax.Array, size: int) -> jax.Array:
    """The square of `side` pixels centred at (cx, cy) of an (H, W, C) image, resized to
    (size, size, C) (bilinear, antialiased; zeros outside the image)."""
    scale = size / side
    translation = size / 2 - center[::-1] * scale  # (y, x) order as the spatial dims
    return jax.image.scale_and_translate(
        image, (size, size, image.shape[-1]), (0, 1), jnp.stack([scale, scale]), translation,
        method="linear", antialias=True,
    )  # fmt: skip


def region_crops(
    images: jax.Array,
    masks: jax.Array,
    size: int,
    key: jax.Array | None = None,
    expand_range: tuple[float, float] = EXPAND_RANGE,
    zero_outside_prob: float = ZERO_OUTSIDE_PROB,
    fixed_expand: float = 1.5,
) -> tuple[jax.Array, jax.Array]:
    """D.5's crops around masks. images (B, H, W, 3) float (0..255 RGB); masks (B, M, h, w)
    bool at any resolution covering the same frame (e.g. SAM's low-res masks of the padded
    input). Returns crops (B, M, size, size, 3) float32 0..255 and their masks (B, M, size,
    size) bool. With key: the expansion factor is drawn from expand_range and pixels outside
    the mask are zeroed with probability zero_outside_prob; without: fixed_expand, nothing
    zeroed (the deterministic crop of inference)."""
    b, n_masks, mh, mw = masks.shape
    h, w = images.shape[1:3]
    cell = jnp.asarray([w / mw, h / mh, w / mw, h / mh], jnp.float32)
    box = _boxes(masks) * cell  # image pixels
    center = (box[..., :2] + box[..., 2:]) / 2
    if key is None:
        factor = jnp.full((b, n_masks), fixed_expand, jnp.float32)
        zero = jnp.zeros((b, n_masks), bool)
    else:
        k1, k2 = jax.random.split(key)
        factor = jax.random.uniform(
            k1, (b, n_masks), minval=expand_range[0], maxval=expand_range[1]
        )
        zero = jax.random.bernoulli(k2, zero_outside_prob, (b, n_masks))
    side = jnp.maximum(jnp.max(box[..., 2:] - box[..., :2], axis=-1) * factor, 1.0)
    # Masks are resampled to the image's resolution inside the crop (nearest cell).
    mask_img = masks.astype(jnp.float32)[..., None]
    scale = jnp.asarray([mw / w, mh / h], jnp.float32)

    def one(image, mask, c, s):
        crop = _crop(image, c, s, size)
        m = _crop(mask, c * scale, s * scale[0], size)[..., 0] > 0.5
        return crop, m

    per_mask = jax.vmap(one, in_axes=(None, 0, 0, 0))
    crops, crop_masks = jax.vmap(per_mask)(images.astype(jnp.float32), mask_img, center, side)
    crops = jnp.where(zero[..., None, None, None] & ~crop_masks[..., None], 0.0, crops)
    return crops, crop_masks


def patch_regions(crop_masks: jax.Array, patch_size: int) -> jax.Array:
    """(..., S, S) bool crop masks -> (..., g*g) bool: the CLIP patches the mask touches."""
    s = crop_masks.shape[-1]
    g = s // patch_size
    x = crop_masks.reshape(*crop_masks.shape[:-2], g, patch_size, g, patch_size)
    return x.any(axis=(-3, -1)).reshape(*crop_masks.shape[:-2], g * g)


def normalize_clip(crops: jax.Array) -> jax.Array:
    """0..255 RGB -> CLIP's normalised input."""
    return (crops / 255.0 - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)


def region_embeddings(
    clip: Clip,
    clip_params: Any,
    images: jax.Array,
    masks: jax.Array,
    key: jax.Array | None = None,
    masked_attention: bool = True,
) -> jax.Array:
    """CLIP image embeddings (B, M, E) of D.5's crops around masks (B, M, h, w) of images
    (B, H, W, 3) 0..255 (`region_crops`; key None: deterministic), with the last layer's
    attention restricted to the mask when masked_attention."""
    c = clip.config
    crops, crop_masks = region_crops(images, masks, c.image_size, key)
    b, m = masks.shape[:2]
    flat = normalize_clip(crops).reshape(b * m, c.image_size, c.image_size, 3)
    region = (
        patch_regions(crop_masks, c.patch_size).reshape(b * m, -1) if masked_attention else None
    )
    emb = clip.apply({"params": clip_params}, flat, region, method=clip.encode_image)
    return emb.reshape(b, m, -1)


@functools.partial(jax.jit, static_argnames=("clip",))
def _encode_text(clip, params, ids):
    emb = clip.apply({"params": params}, ids, method=clip.encode_text)
    return emb / jnp.linalg.norm(emb, axis=-1, keepdims=True)


@functools.partial(jax.jit, static_argnames=("clip",))
def _encode_regions(clip, params, image, masks):
    emb = region_embeddings(clip, params, image[None], masks[None])[0]
    return emb / jnp.linalg.norm(emb, axis=-1, keepdims=True)


@dataclasses.dataclass(frozen=True)
class TextEncoder:
    """A CLIP and its tokenizer, as SAM's text path uses them. `name`: where it was loaded from
    (a folder or Hub id)."""

    clip: Clip
    params: Any
    tokenizer: ClipTokenizer
    name: str = ""

    @property
    def embed_dim(self) -> int:
        return self.clip.config.embed_dim

    def embed_texts(self, texts: str | Sequence[str]) -> np.ndarray:
        """Phrases -> l2-normalised CLIP text embeddings (P, E) float32 (the prompts)."""
        ids = self.tokenizer(texts)
        return np.asarray(_encode_text(self.clip, self.params, jnp.asarray(ids)))

    def embed_regions(self, image: np.ndarray, masks: np.ndarray) -> np.ndarray:
        """uint8 (H, W, 3) image and bool (M, H, W) masks -> l2-normalised CLIP image embeddings
        (M, E) of their D.5 crops (expanded 1.5x, nothing zeroed, masked attention)."""
        image = jnp.asarray(np.asarray(image), jnp.float32)
        masks = jnp.asarray(np.asarray(masks, bool))
        return np.asarray(_encode_regions(self.clip, self.params, image, masks))


def load_text_encoder(path: str | os.PathLike) -> TextEncoder:
    """The CLIP of a transformers CLIPModel folder or Hub id, with its tokenizer."""
    config, params = load_hf_clip(path)
    params = jax.tree.map(jnp.asarray, params)
    tokenizer = load_clip_tokenizer(path, config.context_length)
    return TextEncoder(Clip(config), params, tokenizer, os.fspath(path))


def check_text_path(model: Any, encoder: TextEncoder | None = None) -> None:
    """NoTextPathError, one line, when `model` has no text path (or `encoder`'s embeddings are not
    the width it was trained on)."""
    c = model.config
    if not c.text_embed_dim:
        raise NoTextPathError(
            "this checkpoint has no text path (text_embed_dim 0): text prompts need a SAM "
            "trained with them (docs/text_prompts.md)"
        )
    if encoder is not None and encoder.embed_dim != c.text_embed_dim:
        raise NoTextPathError(
            f"the CLIP {encoder.name or ''} gives {encoder.embed_dim}-wide embeddings, but this "
            f"SAM's text path takes {c.text_embed_dim}"
        )
