"""Two-way transformer of the SAM mask decoder (official `transformer.py`)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from sam_jax.modeling.common import Dense, Dtype, MLPBlock, attention, layer_norm


class Attention(nn.Module):
    """Attention with q/k/v projections to `embedding_dim // downsample_rate` channels.

    q: (B, T, C), k and v: (B, S, C); key_mask: optional bool (B, S), False = ignored key.
    Returns (B, T, C) in the compute dtype.

    Off a CPU (chosen when lowering, `lax.platform_dependent`), the attentions between the few
    prompt tokens and the h*w image tokens fold the image side's projections into the token
    side (`_folded`): the image tokens are read as they are, and neither their projections
    (B, h*w, C / downsample_rate) nor the attention output over them are written out. Same
    function (associativity), other rounding.
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
        heads = self.num_heads
        dense = {
            n: Dense(internal, dtype=self.dtype, name=n) for n in ("q_proj", "k_proj", "v_proj")
        }
        dense["out_proj"] = Dense(self.embedding_dim, dtype=self.dtype, name="out_proj")

        def project(x, name):
            x = dense[name](x.astype(self.dtype))
            return x.reshape(*x.shape[:-1], heads, internal // heads)

        def standard(q, k, v, key_mask):
            q, k, v = project(q, "q_proj"), project(k, "k_proj"), project(v, "v_proj")
            mask = None if key_mask is None else key_mask[:, None, None, :]
            out = attention(q, k, v, mask=mask, impl=self.attention_impl)
            return dense["out_proj"](out.reshape(*out.shape[:-2], internal))

        t, s = q.shape[1], k.shape[1]
        fold = None
        if isinstance(t, int) and isinstance(s, int):  # symbolic sizes (jax.export) stay standard
            fold = "kv" if s >= 8 * t else ("qo" if t >= 8 * s else None)
        lora = bool(self.variables.get("lora")) if not self.is_initializing() else True
        if fold is None or lora or self.attention_impl == "cudnn":
            return standard(q, k, v, key_mask)

        def folded(q, k, v, key_mask):
            return self._folded(fold, q, k, v, key_mask, project, dense["out_proj"], internal)

        return jax.lax.platform_dependent(q, k, v, key_mask, cpu=standard, default=folded)

    def _folded(self, fold, q, k, v, key_mask, project, out_proj, internal):
        """The attention with the long side's projections folded into the short side's.

        fold "kv" (S >> T, the prompt tokens attend to the image): the logits are
        k . (W_k q_h) per head and the output W_v^T (sum_s p v) (+ b_v; b_k shifts every logit
        of a row alike). fold "qo" (T >> S, the image attends to the tokens): the logits are
        q . (W_q k_h) + b_q . k_h and the output sum_(h, s) p (v_h W_o,h) + b_o, one matmul each.
        """
        heads, e = self.num_heads, internal // self.num_heads
        f32, dt = jnp.float32, self.dtype
        params = self.variables["params"]
        scale = e**-0.5

        def weights(name):
            return params[name]["kernel"].astype(f32), params[name]["bias"].astype(f32)

        neg = jnp.finfo(f32).min
        if fold == "kv":
            qh = project(q, "q_proj").astype(f32) * scale  # (B, T, H, e)
            wk, _ = weights("k_proj")
            wv, bv = weights("v_proj")
            qk = jnp.einsum("bthe,che->bthc", qh, wk.reshape(-1, heads, e))  # (B, T, H, C)
            logits = jnp.einsum(
                "bsc,bthc->bhts", k.astype(dt), qk.astype(dt), preferred_element_type=f32
            )
            if key_mask is not None:
                logits = jnp.where(key_mask[:, None, None, :], logits, neg)
            p = jax.nn.softmax(logits, axis=-1)
            pv = jnp.einsum(
                "bhts,bsc->bthc", p.astype(dt), v.astype(dt), preferred_element_type=f32
            )
            out = jnp.einsum("bthc,che->bthe", pv, wv.reshape(-1, heads, e)) + bv.reshape(heads, e)
            return out_proj(out.reshape(*out.shape[:2], internal).astype(dt))
        kh = project(k, "k_proj").astype(f32) * scale  # (B, S, H, e)
        vh = project(v, "v_proj").astype(f32)
        wq, bq = weights("q_proj")
        wo, bo = weights("out_proj")
        kq = jnp.einsum("che,bshe->bchs", wq.reshape(-1, heads, e), kh)  # (B, C, H, S)
        kb = jnp.einsum("he,bshe->bhs", bq.reshape(heads, e), kh)
        logits = jnp.einsum(
            "btc,bchs->bths", q.astype(dt), kq.astype(dt), preferred_element_type=f32
        )
        logits = logits + kb[:, None]
        if key_mask is not None:
            logits = jnp.where(key_mask[:, None, None, :], logits, neg)
        p = jax.nn.softmax(logits, axis=-1)  # (B, T, H, S)
        vo = jnp.einsum("bshe,hec->bhsc", vh, wo.reshape(heads, e, -1))  # (B, H, S, C)
        out = jnp.einsum("bths,bhsc->btc", p.astype(dt), vo.astype(dt), preferred_element_type=f32)
        return (out + bo).astype(dt)


class TwoWayAttentionBlock(nn.Module):
    """Self-attention of tokens, token->image, MLP, image->token cross-attention.

    The tokens (queries) stay float32; the image tokens (keys, one copy per prompt: the largest
    tensors of a training round) are kept in the compute dtype between blocks (float32 or
    bfloat16), their residual sum and LayerNorm computed in float32."""

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
        f32 = jnp.float32
        if self.skip_first_layer_pe:
            queries = self_attn(queries, queries, queries, token_mask).astype(f32)
        else:
            q = queries + query_pe
            queries = queries + self_attn(q, q, queries, token_mask).astype(f32)
        queries = layer_norm(self.layer_norm_eps, "norm1")(queries)

        q, k = queries + query_pe, keys + key_pe
        attn = Attention(d, h, r, name="cross_attn_token_to_image", **kw)
        queries = layer_norm(self.layer_norm_eps, "norm2")(queries + attn(q, k, keys).astype(f32))

        mlp = MLPBlock(self.mlp_dim, d, "relu", self.dtype, name="mlp")
        queries = queries + mlp(queries.astype(self.dtype)).astype(jnp.float32)
        queries = layer_norm(self.layer_norm_eps, "norm3")(queries)

        q, k = queries + query_pe, keys + key_pe
        attn = Attention(d, h, r, name="cross_attn_image_to_token", **kw)
        keys = keys.astype(f32) + attn(k, q, queries, token_mask).astype(f32)
        # The image tokens (one copy per prompt) are stored in the compute dtype.
        keys = layer_norm(self.layer_norm_eps, "norm4")(keys).astype(self.dtype)
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
        queries = queries + final(q, k, keys).astype(jnp.float32)
        queries = layer_norm(1e-5, "norm_final_attn")(queries)
        return queries, keys
