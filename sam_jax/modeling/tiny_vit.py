"""MobileSAM's image encoder: TinyViT with SAM's neck (official `tiny_vit_sam.py`), NHWC.

Shapes: S image side, g = S / 16 embedding grid, C_i the stage widths (`embed_dims`).

    images (B, S, S, 3)
    patch_embed: Conv2d_BN 3x3 s2, GELU, Conv2d_BN 3x3 s2         -> (B, S/4, S/4, C0)
    layers_0: MBConv blocks, then PatchMerging (stride 2)         -> (B, S/8, S/8, C1)
    layers_1: TinyViT blocks (window 7), PatchMerging (stride 2)  -> (B, g, g, C2)
    layers_2: TinyViT blocks (window 14), PatchMerging (stride 1) -> (B, g, g, C3)
    layers_3: TinyViT blocks (window 7)                           -> (B, g, g, C3)
    neck: conv1x1 -> LayerNorm2d -> conv3x3 -> LayerNorm2d        -> (B, g, g, out_chans)

Faithful details of the official code:
- Every Conv2d_BN is a bias-free convolution followed by BatchNorm2d (eps 1e-5) in inference
  mode. The BatchNorm's weight, bias, running_mean and running_var are leaves of the one `params`
  pytree (`.../bn/{scale, bias, running_mean, running_var}`); the running statistics are buffers
  (never trained: `BN_STATISTICS` names them for the optimizer).
- The official PatchMerging uses stride 1 when its output width is 320, 448 or 576 (MobileSAM's
  last merge) and stride 2 otherwise; the official model only runs when that makes the last
  merge (and only it) stride 1, which is what this module always does.
- Attention is windowed; a window's logits get a learned bias per head and per *absolute*
  offset (|dy|, |dx|) between query and key (`attention_biases` (heads, n_offsets), gathered
  with `attention_bias_index`). qkv is laid out per head as [q | k | v].
- Windows are zero-padded (bottom, right) *before* the attention's LayerNorm, so padded tokens
  enter attention as the norm's bias; no mask. A map of exactly one window is not padded.
- A TinyViT block is x + attn(x), then a depthwise Conv2d_BN (`local_conv`, no activation),
  then x + mlp(x) with the MLP's own LayerNorm (eps 1e-5). GELU is exact (erf).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sam_jax.modeling.common import Dense, DropPath, Dtype, attention, gelu, layer_norm
from sam_jax.modeling.image_encoder import REMAT_POLICIES, window_partition, window_unpartition

BN_EPS = 1e-5
# The leaves of each BatchNorm that the official model keeps as buffers (not trained).
BN_STATISTICS = ("running_mean", "running_var")
# Output widths for which the official PatchMerging uses stride 1 (`tiny_vit_sam.py`).
STRIDE_ONE_MERGE_DIMS = (320, 448, 576)


@functools.cache
def attention_bias_index(resolution: tuple[int, int]) -> tuple[np.ndarray, int]:
    """The official index (N, N) of each (query, key) pair of an h x w window into the bias
    table, N = h * w, and the table's length (the number of distinct absolute offsets).

    Offsets (|dy|, |dx|) are numbered in the order the official loop meets them (queries, then
    keys, in row-major order). The returned array is read-only (cached)."""
    h, w = resolution
    points = np.array(list(itertools.product(range(h), range(w))))
    offsets = np.abs(points[:, None, :] - points[None, :, :])  # (N, N, 2)
    codes = (offsets[..., 0] * w + offsets[..., 1]).reshape(-1)
    uniques, first, inverse = np.unique(codes, return_index=True, return_inverse=True)
    rank = np.empty(len(uniques), np.int32)
    rank[np.argsort(first, kind="stable")] = np.arange(len(uniques), dtype=np.int32)
    n = len(points)
    idx = rank[inverse].reshape(n, n)
    idx.flags.writeable = False
    return idx, len(uniques)


class FrozenBatchNorm(nn.Module):
    """BatchNorm2d in inference mode over the last axis, from stored statistics (float32):
    y = x * a + (bias - running_mean * a), a = scale / sqrt(running_var + eps).

    With mean 0, var 1 and scale = sqrt(1 + eps) (float32), a is exactly 1, so a convolution
    whose BatchNorm was folded into it keeps its folded bias exactly in `bias`.
    """

    eps: float = BN_EPS

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        f = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (f,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (f,), jnp.float32)
        mean = self.param("running_mean", nn.initializers.zeros, (f,), jnp.float32)
        var = self.param("running_var", nn.initializers.ones, (f,), jnp.float32)
        a = scale / jnp.sqrt(var + self.eps)
        return x.astype(jnp.float32) * a + (bias - mean * a)


class Conv2dBN(nn.Module):
    """Official Conv2d_BN: bias-free Conv2d (padding kernel_size // 2) then BatchNorm2d in
    inference mode. x (B, H, W, C_in) -> (B, H / stride, W / stride, features), compute dtype."""

    features: int
    kernel_size: int = 1
    stride: int = 1
    groups: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, p = self.kernel_size, self.kernel_size // 2
        y = nn.Conv(
            self.features,
            (k, k),
            strides=(self.stride, self.stride),
            padding=((p, p), (p, p)),
            feature_group_count=self.groups,
            use_bias=False,
            dtype=self.dtype,
            name="c",
        )(x.astype(self.dtype))
        return FrozenBatchNorm(name="bn")(y).astype(self.dtype)


class PatchEmbed(nn.Module):
    """(B, S, S, 3) -> (B, S/4, S/4, embed_dim): Conv2d_BN 3x3 s2 -> GELU -> Conv2d_BN 3x3 s2."""

    embed_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n = self.embed_dim
        x = gelu(Conv2dBN(n // 2, 3, 2, dtype=self.dtype, name="seq_0")(x))
        return Conv2dBN(n, 3, 2, dtype=self.dtype, name="seq_2")(x)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, GELU, depthwise 3x3, GELU, 1x1, + x, GELU. (B, H, W, C)."""

    expand_ratio: float
    drop_path: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        c = x.shape[-1]
        hidden = int(c * self.expand_ratio)
        y = gelu(Conv2dBN(hidden, 1, dtype=self.dtype, name="conv1")(x))
        y = gelu(Conv2dBN(hidden, 3, groups=hidden, dtype=self.dtype, name="conv2")(y))
        y = Conv2dBN(c, 1, dtype=self.dtype, name="conv3")(y)
        y = DropPath(self.drop_path)(y, deterministic)
        return gelu(x + y)


class PatchMerging(nn.Module):
    """(B, H, W, C) -> (B, H / stride, W / stride, out_dim): Conv2d_BN 1x1, GELU, depthwise
    Conv2d_BN 3x3 with `stride`, GELU, Conv2d_BN 1x1."""

    out_dim: int
    stride: int = 2
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = self.out_dim
        x = gelu(Conv2dBN(d, 1, dtype=self.dtype, name="conv1")(x))
        x = gelu(Conv2dBN(d, 3, self.stride, groups=d, dtype=self.dtype, name="conv2")(x))
        return Conv2dBN(d, 1, dtype=self.dtype, name="conv3")(x)


class Attention(nn.Module):
    """TinyViT window attention: x (B', N, C), N = window * window -> (B', N, C).

    LayerNorm (eps 1e-5), qkv per head [q | k | v], logits * hd**-0.5 + the learned bias
    `attention_biases[:, attention_bias_index]` (heads, N, N), softmax (float32), proj.
    """

    num_heads: int
    window_size: int
    dtype: Dtype = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, c = x.shape
        heads = self.num_heads
        hd = c // heads
        idx, n_offsets = attention_bias_index((self.window_size, self.window_size))
        biases = self.param(
            "attention_biases", nn.initializers.zeros, (heads, n_offsets), jnp.float32
        )
        x = layer_norm(1e-5, "norm")(x).astype(self.dtype)
        qkv = Dense(3 * c, dtype=self.dtype, name="qkv")(x).reshape(b, n, heads, 3, hd)
        q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]  # (B', N, heads, hd)
        bias = biases[:, jnp.asarray(idx)][None]  # (1, heads, N, N)
        out = attention(q, k, v, bias=bias, impl=self.attention_impl)
        return Dense(c, dtype=self.dtype, name="proj")(out.reshape(b, n, c))


class Mlp(nn.Module):
    """LayerNorm (eps 1e-5) -> fc1 -> GELU -> fc2 (TinyViT's Mlp, with its own norm)."""

    hidden_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        x = layer_norm(1e-5, "norm")(x).astype(self.dtype)
        x = gelu(Dense(self.hidden_dim, dtype=self.dtype, name="fc1")(x))
        return Dense(c, dtype=self.dtype, name="fc2")(x)


class TinyViTBlock(nn.Module):
    """x + window_attn(x); depthwise local Conv2d_BN; x + mlp(x). x (B, H, W, C) float32."""

    num_heads: int
    window_size: int
    mlp_ratio: float = 4.0
    local_conv_size: int = 3
    drop_path: float = 0.0
    dtype: Dtype = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        bsz, h, w, c = x.shape
        ws = self.window_size
        attn = Attention(self.num_heads, ws, self.dtype, self.attention_impl, name="attn")
        drop = DropPath(self.drop_path)
        if h == ws and w == ws:
            y = attn(x.reshape(bsz, h * w, c)).reshape(bsz, h, w, c)
        else:  # zero padding before the attention's norm, as official
            windows, pad_hw = window_partition(x, ws)
            y = attn(windows.reshape(-1, ws * ws, c)).reshape(-1, ws, ws, c)
            y = window_unpartition(y, ws, pad_hw, (h, w))
        x = x + drop(y.astype(jnp.float32), deterministic)
        x = Conv2dBN(c, self.local_conv_size, groups=c, dtype=self.dtype, name="local_conv")(
            x
        ).astype(jnp.float32)
        y = Mlp(int(c * self.mlp_ratio), self.dtype, name="mlp")(x)
        return x + drop(y.astype(jnp.float32), deterministic)


class Stage(nn.Module):
    """One official layer (`layers_{i}`): `depth` blocks (MBConv for the first stage, the
    official ConvLayer; TinyViT blocks otherwise, BasicLayer), then an optional PatchMerging
    (`downsample`) to `out_dim` with `merge_stride`. x (B, H, W, C) -> (B, H', W', out_dim)."""

    depth: int
    conv: bool
    num_heads: int = 1
    window_size: int = 7
    mlp_ratio: float = 4.0
    mbconv_expand_ratio: float = 4.0
    local_conv_size: int = 3
    drop_paths: Sequence[float] = ()
    out_dim: int | None = None
    merge_stride: int = 2
    dtype: Dtype = jnp.float32
    attention_impl: str = "xla"
    remat_policy: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        block_cls = TinyViTBlock
        if self.remat_policy is not None:
            block_cls = nn.remat(
                TinyViTBlock, policy=REMAT_POLICIES[self.remat_policy], static_argnums=(2,)
            )
        for j in range(self.depth):
            rate = float(self.drop_paths[j]) if self.drop_paths else 0.0
            if self.conv:
                block = MBConv(self.mbconv_expand_ratio, rate, self.dtype, name=f"blocks_{j}")
                x = block(x, deterministic)
            else:
                block = block_cls(
                    num_heads=self.num_heads,
                    window_size=self.window_size,
                    mlp_ratio=self.mlp_ratio,
                    local_conv_size=self.local_conv_size,
                    drop_path=rate,
                    dtype=self.dtype,
                    attention_impl=self.attention_impl,
                    name=f"blocks_{j}",
                )
                x = block(x.astype(jnp.float32), deterministic)
        if self.out_dim is not None:
            x = PatchMerging(self.out_dim, self.merge_stride, self.dtype, name="downsample")(x)
        return x


class TinyViT(nn.Module):
    """MobileSAM's image encoder: images (B, S, S, 3) normalised -> (B, S/16, S/16, out_chans)
    float32 (see the module docstring). Param names follow the official state_dict
    (`layers_{i}/blocks_{j}/...`, `layers_{i}/downsample/...`, `neck_{k}`)."""

    img_size: int = 1024
    embed_dims: Sequence[int] = (64, 128, 160, 320)
    depths: Sequence[int] = (2, 2, 6, 2)
    num_heads: Sequence[int] = (2, 4, 5, 10)
    window_sizes: Sequence[int] = (7, 7, 14, 7)
    mlp_ratio: float = 4.0
    mbconv_expand_ratio: float = 4.0
    local_conv_size: int = 3
    out_chans: int = 256
    drop_path_rate: float = 0.0
    dtype: Dtype = jnp.float32
    attention_impl: str = "xla"
    remat_policy: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        s = self.img_size
        if x.shape[1:] != (s, s, 3):
            raise ValueError(f"images must have shape (B, {s}, {s}, 3), got {x.shape}")
        if self.remat_policy is not None and self.remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"remat_policy must be None or one of {sorted(REMAT_POLICIES)}, "
                f"got {self.remat_policy!r}"
            )
        dims, depths = tuple(self.embed_dims), tuple(self.depths)
        rates = np.linspace(0.0, self.drop_path_rate, sum(depths)).tolist()
        x = PatchEmbed(dims[0], self.dtype, name="patch_embed")(x)
        last = len(dims) - 1
        for i, depth in enumerate(depths):
            first = sum(depths[:i])
            x = Stage(
                depth=depth,
                conv=i == 0,
                num_heads=self.num_heads[i],
                window_size=self.window_sizes[i],
                mlp_ratio=self.mlp_ratio,
                mbconv_expand_ratio=self.mbconv_expand_ratio,
                local_conv_size=self.local_conv_size,
                drop_paths=tuple(rates[first : first + depth]),
                out_dim=dims[i + 1] if i < last else None,
                merge_stride=1 if i == last - 1 else 2,
                dtype=self.dtype,
                attention_impl=self.attention_impl,
                remat_policy=self.remat_policy,
                name=f"layers_{i}",
            )(x, deterministic)
        x = nn.Conv(self.out_chans, (1, 1), use_bias=False, dtype=self.dtype, name="neck_0")(
            x.astype(self.dtype)
        )
        x = layer_norm(1e-6, "neck_1")(x)
        x = nn.Conv(
            self.out_chans,
            (3, 3),
            padding=((1, 1), (1, 1)),
            use_bias=False,
            dtype=self.dtype,
            name="neck_2",
        )(x.astype(self.dtype))
        return layer_norm(1e-6, "neck_3")(x)
