"""Mask decoder of SAM (official `mask_decoder.py`)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from einops import rearrange

from sam_jax.modeling.common import MLP, Dtype, embedding, gelu, layer_norm
from sam_jax.modeling.transformer import TwoWayTransformer


class ConvTranspose2x2(nn.Module):
    """ConvTranspose2d(kernel 2, stride 2) as torch: y[2i+a, 2j+b] = x[i, j] @ W[a, b] + bias.

    kernel (2, 2, in, out) = torch weight (in, out, 2, 2) permuted (2, 3, 0, 1).
    x (..., in) -> (..., 2, 2, out), or channels_first: x (..., in, n) -> (..., 2, 2, out, n)
    with n the pixels (one axis). The sub-pixels (a, b) of each input pixel keep their own axes
    (`unshuffle` interleaves them), so each upscaling is one plain matmul and moves no data.
    """

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, channels_first: bool = False) -> jax.Array:
        c = x.shape[-2] if channels_first else x.shape[-1]
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (2, 2, c, self.features), jnp.float32
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        if channels_first:
            w = kernel.reshape(4, c, self.features).astype(self.dtype)
            y = jnp.einsum("...cn,acf->...afn", x.astype(self.dtype), w)
            y = y + bias.astype(self.dtype)[:, None]
            return y.reshape(*x.shape[:-2], 2, 2, self.features, x.shape[-1])
        w = kernel.transpose(2, 0, 1, 3).reshape(c, 4 * self.features).astype(self.dtype)
        y = (x.astype(self.dtype) @ w).reshape(*x.shape[:-1], 2, 2, self.features)
        return y + bias.astype(self.dtype)


def unshuffle(x: jax.Array) -> jax.Array:
    """(B, h, w, 2, 2, 2, 2, K), the sub-pixel axes of two ConvTranspose2x2 -> (B, K, 4h, 4w)."""
    return rearrange(x, "b h w p q r s k -> b k (h p r) (w q s)")


def unshuffle_channels_first(x: jax.Array) -> jax.Array:
    """(B, K, 2, 2, 2, 2, h, w), the sub-pixel axes of two channels-first ConvTranspose2x2 ->
    (B, K, 4h, 4w)."""
    return rearrange(x, "b k p q r s h w -> b k (h p r) (w q s)")


class MaskDecoder(nn.Module):
    """Predicts masks and IoU scores from an image embedding and prompt embeddings."""

    transformer_dim: int = 256
    num_multimask_outputs: int = 3
    transformer_depth: int = 2
    transformer_mlp_dim: int = 2048
    transformer_num_heads: int = 8
    attention_downsample_rate: int = 2
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    dtype: Dtype = jnp.float32
    attention_impl: str = "xla"
    layer_norm_eps: float = 1e-5  # the two-way blocks' LayerNorms

    @nn.compact
    def __call__(
        self,
        image_embeddings: jax.Array,
        image_pe: jax.Array,
        sparse_prompt_embeddings: jax.Array,
        token_mask: jax.Array,
        dense_prompt_embeddings: jax.Array,
        multimask_output: bool | None,
    ) -> tuple[jax.Array, jax.Array]:
        """Decodes B prompts, each with its own image embedding.

        image_embeddings (B or 1, h, w, C); image_pe (h, w, C); sparse_prompt_embeddings (B, N, C)
        with token_mask (B, N) bool; dense_prompt_embeddings (B, h, w, C).
        Returns masks (B, K, 4h, 4w) float32 logits and iou_pred (B, K): K = 3 (outputs 1..3) with
        multimask_output True, K = 1 (output 0) with False, and all K = 4 outputs with None.
        """
        d = self.transformer_dim
        num_mask_tokens = self.num_multimask_outputs + 1
        iou_token = embedding(1, d, name="iou_token").embedding
        mask_tokens = embedding(num_mask_tokens, d, name="mask_tokens").embedding
        b, n = sparse_prompt_embeddings.shape[:2]
        output_tokens = jnp.concatenate([iou_token, mask_tokens], axis=0)
        output_tokens = jnp.broadcast_to(output_tokens, (b, *output_tokens.shape))
        tokens = jnp.concatenate(
            [output_tokens, sparse_prompt_embeddings.astype(jnp.float32)], axis=1
        )
        token_mask = jnp.concatenate(
            [jnp.ones((b, 1 + num_mask_tokens), bool), token_mask.astype(bool)], axis=1
        )

        h, w = image_embeddings.shape[1:3]
        src = image_embeddings.astype(jnp.float32) + dense_prompt_embeddings
        src = src.astype(self.dtype).reshape(b, h * w, d)  # one copy per prompt: compute dtype
        pos_src = image_pe.reshape(1, h * w, d)
        hs, src = TwoWayTransformer(
            self.transformer_depth,
            d,
            self.transformer_num_heads,
            self.transformer_mlp_dim,
            self.attention_downsample_rate,
            self.dtype,
            self.attention_impl,
            self.layer_norm_eps,
            name="transformer",
        )(src, pos_src, tokens, token_mask)
        iou_token_out = hs[:, 0]
        mask_tokens_out = hs[:, 1 : 1 + num_mask_tokens]

        hyper_in = jnp.stack(
            [
                MLP(d, d // 8, 3, self.dtype, name=f"output_hypernetworks_mlps_{i}")(
                    mask_tokens_out[:, i].astype(self.dtype)
                )
                for i in range(num_mask_tokens)
            ],
            axis=1,
        )  # (B, K+1, C/8)
        outputs = {None: slice(None), True: slice(1, None), False: slice(0, 1)}[multimask_output]
        up0 = ConvTranspose2x2(d // 4, self.dtype, name="output_upscaling_0")
        norm = layer_norm(1e-6, "output_upscaling_1")
        up3 = ConvTranspose2x2(d // 8, self.dtype, name="output_upscaling_3")

        def channels_last(src, hyper_in):  # the sub-pixel axes beside the channels
            x = up0(src.reshape(b, h, w, d))
            x = gelu(norm(x)).astype(self.dtype)
            x = gelu(up3(x))
            masks = jnp.einsum("bhwpqrsc,bkc->bhwpqrsk", x.astype(self.dtype), hyper_in)
            return unshuffle(masks[..., outputs].astype(jnp.float32))

        def channels_first(src, hyper_in):
            # (B, C, h*w), the pixels minor: every tensor of this part (one per prompt: the
            # largest of a training round) fills whole (8, 128) memory tiles, where channels-last
            # the 32 or 64 channels or the 64-pixel rows are padded to 128 lanes.
            x = up0(jnp.swapaxes(src, 1, 2), channels_first=True)  # (B, 2, 2, C/4, h*w)
            x = jnp.moveaxis(gelu(norm(jnp.moveaxis(x, -2, -1))), -1, -2).astype(self.dtype)
            x = gelu(up3(x, channels_first=True))  # (B, 2, 2, 2, 2, C/8, h*w)
            masks = jnp.einsum("bpqrscn,bkc->bkpqrsn", x.astype(self.dtype), hyper_in)
            masks = masks[:, outputs].astype(jnp.float32)
            return unshuffle_channels_first(masks.reshape(*masks.shape[:6], h, w))

        # A CPU keeps its (faster there) channels-last layout; the choice is made when lowering
        # for the platform. The params are created outside the choice (its branches are traced).
        if self.is_initializing():
            masks = channels_last(src, hyper_in)
        else:
            masks = jax.lax.platform_dependent(
                src, hyper_in, cpu=channels_last, default=channels_first
            )
        iou_pred = MLP(
            self.iou_head_hidden_dim,
            num_mask_tokens,
            self.iou_head_depth,
            self.dtype,
            name="iou_prediction_head",
        )(iou_token_out.astype(self.dtype)).astype(jnp.float32)
        return masks, iou_pred[:, outputs]
