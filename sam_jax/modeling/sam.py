"""The SAM model: image encoder + prompt encoder + mask decoder (official `sam.py`)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sam_jax.config import SamConfig
from sam_jax.modeling.common import ATTENTION_IMPLS
from sam_jax.modeling.image_encoder import REMAT_POLICIES, ImageEncoderViT
from sam_jax.modeling.mask_decoder import MaskDecoder
from sam_jax.modeling.prompt_encoder import PromptEncoder
from sam_jax.modeling.tiny_vit import TinyViT

# Parameters that the official model keeps as (untrained) buffers.
BUFFER_PARAMS = (("prompt_encoder", "pe_layer", "positional_encoding_gaussian_matrix"),)


def build_image_encoder(
    c: SamConfig, dtype: Any, attention_impl: str, remat_policy: str | None
) -> nn.Module:
    """The image encoder `c.encoder_type` names: normalised images (B, S, S, 3) -> embeddings
    (B, g, g, prompt_embed_dim). The one place that knows the encoder kinds (the seam)."""
    if c.encoder_type == "vit":
        return ImageEncoderViT(
            img_size=c.image_size,
            patch_size=c.patch_size,
            embed_dim=c.encoder_embed_dim,
            depth=c.encoder_depth,
            num_heads=c.encoder_num_heads,
            mlp_ratio=c.mlp_ratio,
            out_chans=c.prompt_embed_dim,
            window_size=c.window_size,
            global_attn_indexes=c.encoder_global_attn_indexes,
            drop_path_rate=c.drop_path_rate,
            dtype=dtype,
            attention_impl=attention_impl,
            remat_policy=remat_policy,
        )
    if c.encoder_type == "tiny_vit":
        return TinyViT(
            img_size=c.image_size,
            embed_dims=c.tiny_vit_embed_dims,
            depths=c.tiny_vit_depths,
            num_heads=c.tiny_vit_num_heads,
            window_sizes=c.tiny_vit_window_sizes,
            mlp_ratio=c.tiny_vit_mlp_ratio,
            mbconv_expand_ratio=c.tiny_vit_mbconv_expand_ratio,
            local_conv_size=c.tiny_vit_local_conv_size,
            out_chans=c.prompt_embed_dim,
            drop_path_rate=c.drop_path_rate,
            dtype=dtype,
            attention_impl=attention_impl,
            remat_policy=remat_policy,
        )
    raise ValueError(f"no image encoder for encoder_type {c.encoder_type!r}")


class Sam(nn.Module):
    """SAM. Use `encode` once per image and `decode` for any number of prompts.

    Attributes: config (architecture), dtype (compute dtype: float32 or bfloat16; params, LayerNorm
    and softmax stay float32), attention_impl ("xla" | "cudnn" | "auto"), remat_policy for the
    encoder blocks (None, "full", "dots_saveable", ...).
    """

    config: SamConfig
    dtype: Any = jnp.float32
    attention_impl: str = "xla"
    remat_policy: str | None = None

    def setup(self):
        c = self.config
        g = c.embedding_size
        self.image_encoder = build_image_encoder(
            c, self.dtype, self.attention_impl, self.remat_policy
        )
        self.prompt_encoder = PromptEncoder(
            embed_dim=c.prompt_embed_dim,
            image_embedding_size=(g, g),
            input_image_size=(c.image_size, c.image_size),
            mask_in_chans=c.mask_in_chans,
            pe_scale=c.pe_scale,
            dtype=self.dtype,
            layer_norm_eps=c.prompt_layer_norm_eps,
            text_embed_dim=c.text_embed_dim,
        )
        self.mask_decoder = MaskDecoder(
            transformer_dim=c.prompt_embed_dim,
            num_multimask_outputs=c.num_multimask_outputs,
            transformer_depth=c.decoder_depth,
            transformer_mlp_dim=c.decoder_mlp_dim,
            transformer_num_heads=c.decoder_num_heads,
            attention_downsample_rate=c.attention_downsample_rate,
            iou_head_depth=c.iou_head_depth,
            iou_head_hidden_dim=c.iou_head_hidden_dim,
            dtype=self.dtype,
            attention_impl=self.attention_impl,
            layer_norm_eps=c.decoder_layer_norm_eps,
        )

    def encode(self, images: jax.Array, deterministic: bool = True) -> jax.Array:
        """images (B, S, S, 3) normalised and padded -> embeddings (B, g, g, D) float32."""
        return self.image_encoder(images, deterministic)

    def decode(
        self,
        image_embeddings: jax.Array,
        points: jax.Array,
        labels: jax.Array,
        mask_input: jax.Array | None = None,
        has_mask: jax.Array | None = None,
        multimask_output: bool | None = True,
        text: jax.Array | None = None,
        has_text: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """Decodes P prompts for each of B images.

        image_embeddings (B, g, g, D); points (B, P, N, 2) xy in the S x S input frame; labels
        (B, P, N) int (1 fg, 0 bg, -1 not-a-point, 2/3 box corners, PAD_LABEL ignored);
        mask_input (B, P, 4g, 4g) logits or None; has_mask (B, P) bool or None.
        text (B, P, E) CLIP embeddings (of a phrase, or in training of a mask's region) or None,
        with has_text (B, P) bool or None (all): one more sparse token before the points, masked
        out of attention where has_text is False. Only a model with config.text_embed_dim = E
        takes it; without text the decoder computes exactly what it did before.
        Returns low-res mask logits (B, P, K, 4g, 4g) and IoU predictions (B, P, K), float32,
        with K = num_multimask_outputs if multimask_output else 1; multimask_output=None returns
        all num_multimask_outputs + 1 outputs (index 0 is the single-mask output), in one pass.

        Shapes are not checked here: callers pass the shapes above (`functional.decode_prompts`
        checks them for users).
        """
        b, p, n = labels.shape
        g, d = self.config.embedding_size, self.config.prompt_embed_dim
        sparse, token_mask = self.prompt_encoder.embed_points(points, labels)
        if text is not None:
            if text.shape[-1] != self.config.text_embed_dim:
                raise ValueError(
                    f"this model takes text embeddings of width {self.config.text_embed_dim} "
                    f"(0: no text path), got {text.shape[-1]}"
                )
            has_text = jnp.ones((b, p), bool) if has_text is None else has_text
            sparse = jnp.concatenate([self.prompt_encoder.embed_text(text)[:, :, None], sparse], 2)
            token_mask = jnp.concatenate([has_text[..., None], token_mask], axis=2)
            n += 1
        dense = self.prompt_encoder.dense_embeddings((b, p), mask_input, has_mask)
        src = jnp.broadcast_to(image_embeddings[:, None], (b, p, g, g, d))
        masks, iou = self.mask_decoder(
            src.reshape(b * p, g, g, d),
            self.prompt_encoder.get_dense_pe(),
            sparse.reshape(b * p, n, d),
            token_mask.reshape(b * p, n),
            dense.reshape(b * p, g, g, d),
            multimask_output,
        )
        return masks.reshape(b, p, *masks.shape[1:]), iou.reshape(b, p, -1)

    def __call__(self, images, points, labels, mask_input=None, multimask_output=True, text=None):
        """Encode + decode in one call (used to initialise all parameters)."""
        emb = self.encode(images)
        return self.decode(emb, points, labels, mask_input, None, multimask_output, text)

    def init_params(self, rng: jax.Array) -> dict:
        """Initialises a float32 params pytree without running the model."""
        s, m = self.config.image_size, self.config.low_res_size
        shapes = (
            jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32),
            jax.ShapeDtypeStruct((1, 1, 2, 2), jnp.float32),
            jax.ShapeDtypeStruct((1, 1, 2), jnp.int32),
            jax.ShapeDtypeStruct((1, 1, m, m), jnp.float32),
        )
        e = self.config.text_embed_dim
        text = {"text": jax.ShapeDtypeStruct((1, 1, e), jnp.float32)} if e else {}
        return jax.jit(lambda r: self.lazy_init(r, *shapes, **text)["params"])(rng)

    def param_shapes(self) -> dict:
        """The params pytree as jax.ShapeDtypeStruct leaves (no allocation)."""
        return jax.eval_shape(self.init_params, jax.random.key(0))


def build_sam(
    config: SamConfig,
    dtype: Any = jnp.float32,
    attention_impl: str = "xla",
    remat_policy: str | None = None,
) -> Sam:
    """Builds the SAM module for a config; see `Sam` for the runtime options."""
    if attention_impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {attention_impl!r}")
    if remat_policy is not None and remat_policy not in REMAT_POLICIES:
        raise ValueError(f"remat_policy must be None or one of {sorted(REMAT_POLICIES)}")
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    return Sam(config, dtype=dtype, attention_impl=attention_impl, remat_policy=remat_policy)
