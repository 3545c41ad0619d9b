"""Building blocks shared by the SAM modules: norms, MLPs, attention."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

ATTENTION_IMPLS = ("xla", "cudnn", "auto")


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, as torch.nn.GELU() (Flax's default is the tanh approximation)."""
    return jax.nn.gelu(x, approximate=False)


def layer_norm(eps: float, name: str | None = None) -> nn.LayerNorm:
    """LayerNorm over the last (channel) axis, computed in float32.

    Also serves as the official LayerNorm2d, since our feature maps are NHWC.
    """
    return nn.LayerNorm(epsilon=eps, dtype=jnp.float32, use_fast_variance=False, name=name)


def accumulating_dot_general(lhs, rhs, dimension_numbers, precision=None, **kwargs):
    """`lax.dot_general` that, on a CPU, returns the products of bfloat16 or float16 operands in
    float32 (the caller rounds them). XLA's CPU backend runs bf16 x bf16 -> f32 products on AMX or
    AVX-512 BF16 where the CPU has them (about 3x its float32 rate) but bf16 -> bf16 ones at the
    float32 rate. Other backends and float32 operands: plain `lax.dot_general`."""
    low = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if (
        kwargs.get("preferred_element_type") is None
        and jnp.result_type(lhs, rhs) in low
        and jax.default_backend() == "cpu"
    ):
        kwargs["preferred_element_type"] = jnp.float32
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision, **kwargs)


def embedding(num: int, dim: int, name: str | None = None) -> nn.Embed:
    """A (num, dim) table stored as `<name>/embedding`, N(0, 1) init as torch.nn.Embedding."""
    return nn.Embed(num, dim, embedding_init=nn.initializers.normal(1.0), name=name)


class Dense(nn.Dense):
    """nn.Dense (same params, same arithmetic) plus an optional low-rank adapter (LoRA).

    The product goes through `accumulating_dot_general`; the output has the compute dtype.

    When the `lora` collection holds `a` (in, r) and `b` (r, out) for this layer (see
    sam_jax.modeling.lora), y = x W + bias + (dropout(x) a) b; `b` arrives already scaled by
    alpha / r. Dropout applies when the collection also holds `rate` and a `lora_dropout` rng is
    given. Without the collection this is exactly nn.Dense.
    """

    dot_general: Any = accumulating_dot_general

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = super().__call__(x)
        if self.dtype is not None:
            y = y.astype(self.dtype)
        if not self.has_variable("lora", "a"):
            return y
        a, b = self.get_variable("lora", "a"), self.get_variable("lora", "b")
        h = x
        if self.has_variable("lora", "rate") and self.has_rng("lora_dropout"):
            keep = 1.0 - self.get_variable("lora", "rate")
            mask = jax.random.bernoulli(self.make_rng("lora_dropout"), keep, x.shape)
            h = jnp.where(mask, x / keep, 0)
        h, a, b = self.promote_dtype(h, a, b, dtype=self.dtype)
        return y + (h @ a) @ b


class MLPBlock(nn.Module):
    """lin1 -> act -> lin2 (the official MLPBlock)."""

    hidden_dim: int
    out_dim: int
    act: str = "gelu"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = Dense(self.hidden_dim, dtype=self.dtype, name="lin1")(x)
        x = gelu(x) if self.act == "gelu" else nn.relu(x)
        return Dense(self.out_dim, dtype=self.dtype, name="lin2")(x)


class MLP(nn.Module):
    """`num_layers` Dense layers with ReLU between (the official mask-decoder MLP)."""

    hidden_dim: int
    out_dim: int
    num_layers: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_layers):
            last = i == self.num_layers - 1
            x = Dense(
                self.out_dim if last else self.hidden_dim, dtype=self.dtype, name=f"layers_{i}"
            )(x)
            if not last:
                x = nn.relu(x)
        return x


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    impl: str = "xla",
) -> jax.Array:
    """Scaled dot-product attention through `jax.nn.dot_product_attention`.

    q: (B, T, heads, hd); k, v: (B, S, heads, hd); bias: broadcastable to (B, heads, T, S), added
    to the scaled logits; mask: bool broadcastable to (B, heads, T, S), False = masked out.
    Logits and softmax are float32 whatever the compute dtype. Returns (B, T, heads, hd).
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    if bias is not None and impl != "xla":
        bias = bias.astype(q.dtype)  # the cuDNN kernel wants the bias in the compute dtype
    return jax.nn.dot_product_attention(
        q, k, v, bias=bias, mask=mask, implementation=None if impl == "auto" else impl
    )


class DropPath(nn.Module):
    """Stochastic depth: drops the residual branch per sample with probability `rate`."""

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        if deterministic or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
        return jnp.where(mask, x / keep, 0).astype(x.dtype)
