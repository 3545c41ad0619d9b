"""CLIP (Radford et al. 2021) in Flax: the image and text towers of transformers' `CLIPModel`,
which SAM's text prompts use (SAM paper 7.5, D.5: the CLIP image embedding of a mask's region as
a prompt in training, the CLIP text embedding of a phrase at inference).

Both towers are pre-LayerNorm transformers of the same block (self-attention, then an MLP with
QuickGELU or GELU). Vision: a patch convolution without bias, a class token, learned position
embeddings, `pre_layrnorm` (transformers' spelling), the blocks, `post_layernorm` of the class
token, `visual_projection` (no bias). Text: token and position embeddings, causal blocks,
`final_layer_norm`, the hidden state of the end-of-text token (the largest token id, OpenAI's
vocabulary; or the first `eos_token_id`), `text_projection` (no bias). Module and parameter names
follow transformers' so that its state_dict maps by key (`sam_jax.checkpoints.clip`).

Shapes: images (B, S, S, 3) NHWC, normalised with CLIP's mean and std; token ids (B, L) int32;
`encode_image` -> (B, E), `encode_text` -> (B, E) (projected, not normalised, as transformers'
`get_image_features` / `get_text_features`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# CLIP's pixel statistics (on 0..1 RGB), what its image processor normalises with.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


@dataclasses.dataclass(frozen=True)
class ClipConfig:
    """A CLIP architecture (the fields of transformers' CLIPConfig that decide the weights and
    what they compute). eos_token_id: None pools the largest token id's position (OpenAI,
    open_clip), else the first position of that id (transformers' newer configs)."""

    embed_dim: int = 512  # projection_dim
    image_size: int = 224
    patch_size: int = 32
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    vision_mlp_dim: int = 3072
    vocab_size: int = 49408
    context_length: int = 77
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    text_mlp_dim: int = 2048
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int | None = None

    def __post_init__(self):
        problems = []
        if self.hidden_act not in ACTIVATIONS:
            problems.append(f"hidden_act must be one of {sorted(ACTIVATIONS)}")
        if self.image_size % self.patch_size:
            problems.append("image_size must be a multiple of patch_size")
        for width, heads in (
            (self.vision_width, self.vision_heads),
            (self.text_width, self.text_heads),
        ):
            if heads <= 0 or width % heads:
                problems.append(f"width {width} is not divisible by {heads} heads")
        if problems:
            raise ValueError("invalid ClipConfig: " + "; ".join(problems))

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def replace(self, **changes: Any) -> ClipConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClipConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown ClipConfig fields: {unknown}")
        return cls(**d)


def _layer_norm(eps: float, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=eps, dtype=jnp.float32, use_fast_variance=False, name=name)


class ClipAttention(nn.Module):
    """Multi-head self-attention with q, k, v and out projections (biases): x (B, T, D)."""

    width: int
    heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, causal: bool, mask=None):
        """mask: None or (B, 1, T, T) bool, where a query may attend (besides causal)."""
        b, t, d = x.shape
        hd = d // self.heads

        def proj(name):
            return nn.Dense(d, dtype=self.dtype, name=name)(x).reshape(b, t, self.heads, hd)

        q, k, v = proj("q_proj"), proj("k_proj"), proj("v_proj")
        if causal:
            tril = jnp.tril(jnp.ones((t, t), bool))[None, None]
            mask = tril if mask is None else mask & tril
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=hd**-0.5)
        return nn.Dense(d, dtype=self.dtype, name="out_proj")(out.reshape(b, t, d))


class ClipEncoderLayer(nn.Module):
    """x + attn(layer_norm1(x)); x + mlp(layer_norm2(x))."""

    width: int
    heads: int
    mlp_dim: int
    hidden_act: str
    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, causal: bool, mask=None):
        h = _layer_norm(self.eps, "layer_norm1")(x).astype(self.dtype)
        attn = ClipAttention(self.width, self.heads, self.dtype, name="self_attn")
        x = x + attn(h, causal, mask)
        h = _layer_norm(self.eps, "layer_norm2")(x).astype(self.dtype)
        h = nn.Dense(self.mlp_dim, dtype=self.dtype, name="fc1")(h)
        h = nn.Dense(self.width, dtype=self.dtype, name="fc2")(ACTIVATIONS[self.hidden_act](h))
        return x + h.astype(jnp.float32)


class ClipEncoder(nn.Module):
    width: int
    heads: int
    mlp_dim: int
    layers: int
    hidden_act: str
    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, causal: bool = False, last_mask=None):
        """last_mask: None or (B, 1, T, T) bool, the attention mask of the last layer only."""
        for i in range(self.layers):
            x = ClipEncoderLayer(
                self.width, self.heads, self.mlp_dim, self.hidden_act, self.eps, self.dtype,
                name=f"layers_{i}",
            )(x, causal, last_mask if i == self.layers - 1 else None)  # fmt: skip
        return x


def region_attention_mask(region: jax.Array) -> jax.Array:
    """(B, g*g) bool patches of a region -> (B, 1, 1 + g*g, 1 + g*g) bool: the class token (the
    output) attends only to itself and the region's patches (SAM D.5's masked attention in the
    last layer); the other tokens attend everywhere. An empty region restricts nothing."""
    b, n = region.shape
    region = region | ~region.any(axis=-1, keepdims=True)
    cls_row = jnp.concatenate([jnp.ones((b, 1), bool), region], axis=1)
    mask = jnp.ones((b, 1 + n, 1 + n), bool).at[:, 0].set(cls_row)
    return mask[:, None]


class ClipVision(nn.Module):
    """images (B, S, S, 3) -> pooled (B, vision_width): the class token after post_layernorm.
    region: None or (B, g*g) bool patches (row-major): the class token's attention in the last
    layer is restricted to them (`region_attention_mask`)."""

    config: ClipConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images, region=None):
        c = self.config
        p, w = c.patch_size, c.vision_width
        patches = nn.Conv(
            w, (p, p), strides=(p, p), padding="VALID", use_bias=False, dtype=self.dtype,
            name="patch_embedding",
        )(images.astype(self.dtype))  # fmt: skip
        b = patches.shape[0]
        x = patches.reshape(b, -1, w).astype(jnp.float32)
        cls = self.param("class_embedding", nn.initializers.normal(0.02), (w,))
        pos = self.param("position_embedding", nn.initializers.normal(0.02), (c.grid**2 + 1, w))
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, w)), x], axis=1) + pos
        x = _layer_norm(c.layer_norm_eps, "pre_layrnorm")(x)
        x = ClipEncoder(
            w, c.vision_heads, c.vision_mlp_dim, c.vision_layers, c.hidden_act,
            c.layer_norm_eps, self.dtype, name="encoder",
        )(x, last_mask=None if region is None else region_attention_mask(region))  # fmt: skip
        return _layer_norm(c.layer_norm_eps, "post_layernorm")(x[:, 0])


class ClipText(nn.Module):
    """token ids (B, L) -> pooled (B, text_width): the end-of-text token's hidden state."""

    config: ClipConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, ids):
        c = self.config
        w, length = c.text_width, ids.shape[-1]
        tokens = self.param("token_embedding", nn.initializers.normal(0.02), (c.vocab_size, w))
        pos = self.param("position_embedding", nn.initializers.normal(0.01), (c.context_length, w))
        x = tokens[ids] + pos[:length]
        x = ClipEncoder(
            w, c.text_heads, c.text_mlp_dim, c.text_layers, c.hidden_act, c.layer_norm_eps,
            self.dtype, name="encoder",
        )(x, causal=True)  # fmt: skip
        x = _layer_norm(c.layer_norm_eps, "final_layer_norm")(x)
        if c.eos_token_id is None:
            end = jnp.argmax(ids, axis=-1)
        else:
            end = jnp.argmax(ids == c.eos_token_id, axis=-1)
        return jnp.take_along_axis(x, end[:, None, None], axis=1)[:, 0]


class Clip(nn.Module):
    """Both towers and their projections into the joint embedding space (E = embed_dim)."""

    config: ClipConfig
    dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        self.vision_model = ClipVision(c, self.dtype)
        self.text_model = ClipText(c, self.dtype)
        self.visual_projection = nn.Dense(c.embed_dim, use_bias=False, dtype=self.dtype)
        self.text_projection = nn.Dense(c.embed_dim, use_bias=False, dtype=self.dtype)
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(2.6592), ())

    def encode_image(self, images: jax.Array, region: jax.Array | None = None) -> jax.Array:
        """images (B, S, S, 3) normalised -> image embeddings (B, E) float32. region: None or
        (B, grid*grid) bool patches the output token attends to in the last layer (D.5)."""
        return self.visual_projection(self.vision_model(images, region)).astype(jnp.float32)

    def encode_text(self, ids: jax.Array) -> jax.Array:
        """token ids (B, L) -> text embeddings (B, E) float32."""
        return self.text_projection(self.text_model(ids)).astype(jnp.float32)

    def __call__(self, images, ids):
        """(image embeddings, text embeddings, logit scale): what a contrastive loss takes."""
        return self.encode_image(images), self.encode_text(ids), self.logit_scale

    def init_params(self, rng: jax.Array) -> dict:
        """A float32 params pytree, without running the model."""
        c = self.config
        images = jax.ShapeDtypeStruct((1, c.image_size, c.image_size, 3), jnp.float32)
        ids = jax.ShapeDtypeStruct((1, c.context_length), jnp.int32)
        return jax.jit(lambda r: self.lazy_init(r, images, ids)["params"])(rng)
