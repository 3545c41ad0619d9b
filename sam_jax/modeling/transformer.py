"""Two-way transformer of the SAM mask decoder (official `transformer.py`)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from sam_jax.modeling.common import Dense, Dtype, MLPBlock, attention, layer_norm


class Attention(nn.Module):
    """Attention with q/k/v projections to `embedding_dim // downsample_rate` channels.

    q: (B, T, C), k and v: (B, S, C); key_mask: optional bool (B, S), False = ignored key.
    """

    embedding_dim: int
    num_heads: int
    downsample_rate: int = 1
    dtype: Dtype = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, q, k, v, key_mask: jax.Array | None = None) -> jax.Array:
        internal = self.embedding_dim // self.downsample_rate
        if internal % self.num_heads:
            raise ValueError("num_heads must divide embedding_dim // downsample_rate")

        def project(x, name):
            x = Dense(internal, dtype=self.dtype, name=name)(x.astype(self.dtype))
            return x.reshape(*x.shape[:-1], self.num_heads, internal // self.num_heads)

        q, k, v = project(q, "q_proj"), project(k, "k_proj"), project(v, "v_proj")
        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = attention(q, k, v, mask=mask, impl=self.attention_impl)
        out = out.reshape(*out.shape[:-2], internal)
        return Dense(self.embedding_dim, dtype=self.dtype, name="out_proj")(out).astype(jnp.float32)


class TwoWayAttentionBlock(nn.Module):
    """Self-attention of tokens, token->image, MLP, image->token cross-attention."""

    embedding_dim: int
    num_heads: int
    mlp_dim: int = 2048
    attention_downsample_rate: int = 2
    skip_first_layer_pe: bool = False
    dtype: Dtype = jnp.float32
    attention_impl: str = "xla"
    layer_norm_eps: float = 1e-5  # norm1..norm4 (official nn.LayerNorm; transformers: config)

    @nn.compact
    def __call__(self, queries, keys, query_pe, key_pe, token_mask=None):
        kw = dict(dtype=self.dtype, attention_impl=self.attention_impl)
        d, h, r = self.embedding_dim, self.num_heads, self.attention_downsample_rate
        self_attn = Attention(d, h, 1, name="self_attn", **kw)
        if self.skip_first_layer_pe:
            queries = self_attn(queries, queries, queries, token_mask)
        else:
            q = queries + query_pe
            queries = queries + self_attn(q, q, queries, token_mask)
        queries = layer_norm(self.layer_norm_eps, "norm1")(queries)

        q, k = queries + query_pe, keys + key_pe
        queries = queries + Attention(d, h, r, name="cross_attn_token_to_image", **kw)(q, k, keys)
        queries = layer_norm(self.layer_norm_eps, "norm2")(queries)

        mlp = MLPBlock(self.mlp_dim, d, "relu", self.dtype, name="mlp")
        queries = queries + mlp(queries.astype(self.dtype)).astype(jnp.float32)
        queries = layer_norm(self.layer_norm_eps, "norm3")(queries)

        q, k = queries + query_pe, keys + key_pe
        attn = Attention(d, h, r, name="cross_attn_image_to_token", **kw)
        keys = keys + attn(k, q, queries, token_mask)
        keys = layer_norm(self.layer_norm_eps, "norm4")(keys)
        return queries, keys


class TwoWayTransformer(nn.Module):
    """image (B, HW, C), image_pe (B or 1, HW, C), tokens (B, T, C) -> (tokens, image)."""

    depth: int
    embedding_dim: int
    num_heads: int
    mlp_dim: int
    attention_downsample_rate: int = 2
    dtype: Dtype = jnp.float32
    attention_impl: str = "xla"
    layer_norm_eps: float = 1e-5  # the blocks' norm1..norm4 (norm_final_attn is always 1e-5)

    @nn.compact
    def __call__(self, image_embedding, image_pe, point_embedding, token_mask=None):
        kw = dict(dtype=self.dtype, attention_impl=self.attention_impl)
        queries, keys = point_embedding, image_embedding
        for i in range(self.depth):
            queries, keys = TwoWayAttentionBlock(
                self.embedding_dim,
                self.num_heads,
                self.mlp_dim,
                self.attention_downsample_rate,
                skip_first_layer_pe=i == 0,
                layer_norm_eps=self.layer_norm_eps,
                name=f"layers_{i}",
                **kw,
            )(queries, keys, point_embedding, image_pe, token_mask)
        q, k = queries + point_embedding, keys + image_pe
        final = Attention(
            self.embedding_dim,
            self.num_heads,
            self.attention_downsample_rate,
            name="final_attn_token_to_image",
            **kw,
        )
        queries = queries + final(q, k, keys)
        queries = layer_norm(1e-5, "norm_final_attn")(queries)
        return queries, keys
