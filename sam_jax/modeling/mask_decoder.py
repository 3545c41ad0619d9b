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
    x (..., in) -> (..., 2, 2, out): the sub-pixels (a, b) of each input pixel keep their own
    axes (`unshuffle` interleaves them), so each upscaling is one plain matmul and moves no data.
    """

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (2, 2, c, self.features), jnp.float32
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        w = kernel.transpose(2, 0, 1, 3).reshape(c, 4 * self.features).astype(self.dtype)
        y = (x.astype(self.dtype) @ w).reshape(*x.shape[:-1], 2, 2, self.features)
        return y + bias.astype(self.dtype)


def unshuffle(x: jax.Array) -> jax.Array:
    """(B, h, w, 2, 2, 2, 2, K), the sub-pixel axes of two ConvTranspose2x2 -> (B, K, 4h, 4w)."""
    return rearrange(x, "b h w p q r s k -> b k (h p r) (w q s)")


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
        src = src.reshape(b, h * w, d)
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

        x = src.reshape(b, h, w, d)
        x = ConvTranspose2x2(d // 4, self.dtype, name="output_upscaling_0")(x)
        x = gelu(layer_norm(1e-6, "output_upscaling_1")(x)).astype(self.dtype)
        x = gelu(ConvTranspose2x2(d // 8, self.dtype, name="output_upscaling_3")(x))
        hyper_in = jnp.stack(
            [
                MLP(d, d // 8, 3, self.dtype, name=f"output_hypernetworks_mlps_{i}")(
                    mask_tokens_out[:, i].astype(self.dtype)
                )
                for i in range(num_mask_tokens)
            ],
            axis=1,
        )  # (B, K+1, C/8)
        masks = jnp.einsum("bhwpqrsc,bkc->bhwpqrsk", x.astype(self.dtype), hyper_in)
        iou_pred = MLP(
            self.iou_head_hidden_dim,
            num_mask_tokens,
            self.iou_head_depth,
            self.dtype,
            name="iou_prediction_head",
        )(iou_token_out.astype(self.dtype)).astype(jnp.float32)
        outputs = {None: slice(None), True: slice(1, None), False: slice(0, 1)}[multimask_output]
        return unshuffle(masks[..., outputs].astype(jnp.float32)), iou_pred[:, outputs]
