"""Prompt encoder of SAM (official `prompt_encoder.py`): points, boxes and mask prompts, and
(SAM paper 7.5, D.5; never released) text: a CLIP embedding as one more sparse token."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from sam_jax.modeling.common import Dtype, embedding, gelu, layer_norm

PAD_LABEL = -10  # an ignored prompt slot: zero embedding, masked out of the decoder's attention
NOT_A_POINT_LABEL = -1


class PositionEmbeddingRandom(nn.Module):
    """Random Fourier positional encoding (Tancik et al.), gaussian matrix (2, num_pos_feats)."""

    num_pos_feats: int = 128
    scale: float = 1.0

    def setup(self):
        init = lambda key, shape: self.scale * jax.random.normal(key, shape, jnp.float32)
        self.positional_encoding_gaussian_matrix = self.param(
            "positional_encoding_gaussian_matrix", init, (2, self.num_pos_feats)
        )

    def _pe_encoding(self, coords: jax.Array) -> jax.Array:
        """coords (..., 2) in [0, 1] -> (..., 2 * num_pos_feats) = [sin, cos]."""
        coords = 2 * coords.astype(jnp.float32) - 1
        coords = jnp.matmul(
            coords, self.positional_encoding_gaussian_matrix, precision=jax.lax.Precision.HIGHEST
        )
        coords = 2 * math.pi * coords
        return jnp.concatenate([jnp.sin(coords), jnp.cos(coords)], axis=-1)

    def dense(self, size: tuple[int, int]) -> jax.Array:
        """Encoding of the cell centres of an (h, w) grid: (h, w, C)."""
        h, w = size
        y = (jnp.arange(h, dtype=jnp.float32) + 0.5) / h
        x = (jnp.arange(w, dtype=jnp.float32) + 0.5) / w
        grid = jnp.stack(jnp.meshgrid(x, y, indexing="xy"), axis=-1)  # (h, w, 2) as (x, y)
        return self._pe_encoding(grid)

    def with_coords(self, coords: jax.Array, image_size: tuple[int, int]) -> jax.Array:
        """coords (..., 2) as (x, y) pixels in an (H, W) frame -> (..., C)."""
        h, w = image_size
        scale = jnp.array([w, h], jnp.float32)
        return self._pe_encoding(coords.astype(jnp.float32) / scale)


class PromptEncoder(nn.Module):
    """Sparse (points/box corners) and dense (mask) prompt embeddings."""

    embed_dim: int = 256
    image_embedding_size: tuple[int, int] = (64, 64)
    input_image_size: tuple[int, int] = (1024, 1024)
    mask_in_chans: int = 16
    pe_scale: float = 1.0
    dtype: Dtype = jnp.float32
    layer_norm_eps: float = 1e-6  # the mask downscaling's LayerNorm2d
    text_embed_dim: int = 0  # width of the CLIP embeddings taken as prompts (0: no text path)

    def setup(self):
        self.pe_layer = PositionEmbeddingRandom(self.embed_dim // 2, scale=self.pe_scale)
        self.point_embeddings = [embedding(1, self.embed_dim) for _ in range(4)]
        self.not_a_point_embed = embedding(1, self.embed_dim)
        self.no_mask_embed = embedding(1, self.embed_dim)
        self.mask_downscaling_0 = nn.Conv(
            self.mask_in_chans // 4, (2, 2), strides=(2, 2), padding="VALID", dtype=self.dtype
        )
        self.mask_downscaling_1 = layer_norm(self.layer_norm_eps)
        self.mask_downscaling_3 = nn.Conv(
            self.mask_in_chans, (2, 2), strides=(2, 2), padding="VALID", dtype=self.dtype
        )
        self.mask_downscaling_4 = layer_norm(self.layer_norm_eps)
        self.mask_downscaling_6 = nn.Conv(self.embed_dim, (1, 1), dtype=self.dtype)
        if self.text_embed_dim:
            self.text_projection = nn.Dense(self.embed_dim, dtype=jnp.float32)

    def get_dense_pe(self) -> jax.Array:
        """Positional encoding of the image-embedding grid: (h, w, C)."""
        return self.pe_layer.dense(self.image_embedding_size)

    def embed_points(self, points: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
        """points (..., N, 2) xy in the input frame, labels (..., N) -> (..., N, C), valid (..., N).

        Labels: 1/0 positive/negative point, -1 not-a-point, 2/3 box corners, PAD_LABEL ignored.
        """
        labels = labels.astype(jnp.int32)[..., None]
        pe = self.pe_layer.with_coords(points + 0.5, self.input_image_size)
        emb = jnp.where(labels < 0, 0.0, pe)
        emb = emb + jnp.where(labels == NOT_A_POINT_LABEL, self.not_a_point_embed.embedding[0], 0.0)
        for i in range(4):
            emb = emb + jnp.where(labels == i, self.point_embeddings[i].embedding[0], 0.0)
        return emb, labels[..., 0] != PAD_LABEL

    def embed_text(self, clip_embeddings: jax.Array) -> jax.Array:
        """CLIP embeddings (image or text) (..., E) -> sparse tokens (..., C): l2-normalised (as
        D.5 uses them), then a linear projection (its bias is the token's learned "text" type)."""
        x = clip_embeddings.astype(jnp.float32)
        x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-6)
        return self.text_projection(x)

    def embed_masks(self, masks: jax.Array) -> jax.Array:
        """Mask logits (..., 4h, 4w) -> dense embeddings (..., h, w, C)."""
        lead = masks.shape[:-2]
        x = masks.reshape((-1, *masks.shape[-2:], 1)).astype(self.dtype)
        x = gelu(self.mask_downscaling_1(self.mask_downscaling_0(x))).astype(self.dtype)
        x = gelu(self.mask_downscaling_4(self.mask_downscaling_3(x))).astype(self.dtype)
        x = self.mask_downscaling_6(x).astype(jnp.float32)
        return x.reshape(*lead, *x.shape[1:])

    def dense_embeddings(self, lead_shape, masks=None, has_mask=None) -> jax.Array:
        """Dense prompt embeddings (*lead_shape, h, w, C): the mask embedding where a mask is
        given (has_mask True or None), else no_mask_embed broadcast."""
        h, w = self.image_embedding_size
        shape = (*lead_shape, h, w, self.embed_dim)
        no_mask = jnp.broadcast_to(self.no_mask_embed.embedding[0], shape)
        if masks is None:
            return no_mask
        dense = self.embed_masks(masks)
        if has_mask is None:
            return dense
        return jnp.where(has_mask[..., None, None, None], dense, no_mask)
